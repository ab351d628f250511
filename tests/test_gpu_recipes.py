"""A CPU rehearsal of every GPU recipe: each recipe as written, except what makes it big (the model becomes a tiny
randomly initialised stand-in of the same family, the input 4 x 4 patches, 1 epoch, 2 folds when it has folds,
batches of 4), through the real CLI on the demo data: train, then ``predict --run OUT --ensemble f1 --tta flip``.
It proves the recipe's settings load, combine and really run (layer-decayed learning rates, EMA, the KD teacher,
HR views, MixUp/CutMix, gradient accumulation, grad checkpointing, bf16 autocast: CPU autocast supports bf16)
before GPU time is spent on it.

Adding a GPU recipe is one line in GPU_RECIPES; a recipe of a new model family also needs its stand-in in FAMILIES.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import save_tiny_beit
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import build_model_with_cfg, register_model
from timm.models.beit import Beit
from timm.models.eva import Eva

from lowres_birds.cli import main
from lowres_birds.config import load_config, parse_strategy
from lowres_birds.run_dir import FoldsDir, RunDir
from lowres_birds.train import loop, session

GPU_RECIPES = [
    "best",
    "beit-seed",
    "dacon-1st",
    "dacon-1st-beitv2",
]
STAND_IN_PATCHES = 4  # the stand-in's input is 4 x 4 patches
STAND_IN_BATCH = 4  # a few batches of the 30 demo images

# --------------------------------------------------------------------------- tiny timm stand-ins, registered in timm

TINY = dict(embed_dim=32, depth=2, num_heads=2)
# read by timm's register_model: the stand-ins' pretrained configs (no weights anywhere)
default_cfgs: dict[str, dict] = {}


def _register(name: str, model_class: type, mean: tuple, std: tuple, **family_options) -> None:
    """A timm model ``name``: ``model_class`` with the family's options at the TINY size. Its config is a fixed-size
    ViT's
    (the factory builds it at the strategy's size, as the real model) with the family's normalisation and no weights."""
    default_cfgs[name] = {"fixed_input_size": True, "mean": mean, "std": std, "num_classes": 1000}

    def entrypoint(pretrained: bool = False, **kwargs):
        return build_model_with_cfg(model_class, name, pretrained, **{**family_options, **TINY, **kwargs})

    entrypoint.__name__, entrypoint.__module__ = name, __name__
    register_model(entrypoint)


# EVA-02 (eva02_large_patch14_448): rotary position embeddings, SwiGLU MLP with its norm, separate q/k/v.
_register(
    "stand_in_eva02",
    Eva,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    patch_size=14,
    mlp_ratio=4 * 2 / 3,
    qkv_fused=False,
    swiglu_mlp=True,
    scale_mlp=True,
    use_rot_pos_emb=True,
    ref_feat_shape=(16, 16),
)
# EVA v1 (eva_giant_patch14_*): absolute position embeddings, fused qkv, GELU MLP.
_register("stand_in_eva", Eva, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, patch_size=14, mlp_ratio=6144 / 1408)
# BEiT v2 (beitv2_large_patch16_224): relative position bias, layer scale, no absolute position embeddings.
_register(
    "stand_in_beitv2",
    Beit,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    patch_size=16,
    use_abs_pos_emb=False,
    use_rel_pos_bias=True,
    init_values=1e-5,
)

# (the recipe's model id starts with, stand-in, patch size); hf: BEiT is a tiny folder saved like microsoft/beit-base-
# patch16-224-pt22k.
FAMILIES = [
    ("timm:eva02_", "timm:stand_in_eva02", 14),
    ("timm:eva_", "timm:stand_in_eva", 14),
    ("timm:beitv2_", "timm:stand_in_beitv2", 16),
    ("hf:microsoft/beit-", "hf:BEIT_FOLDER", 16),
]


def stand_in(model: str, size: int, folder: Path) -> str:
    source = next((stand for prefix, stand, _ in FAMILIES if model.startswith(prefix)), None)
    if source is None:
        pytest.fail(f"no stand-in for {model}: add its family to FAMILIES")
    if source == "hf:BEIT_FOLDER":
        beit = save_tiny_beit(
            folder / "tiny-beit",
            size,
            use_absolute_position_embeddings=False,
            use_shared_relative_position_bias=True,
            layer_scale_init_value=0.1,
            use_mean_pooling=True,
        )
        source = f"hf:{beit}"
    return source


def patch_size(model: str) -> int:
    return next(patch for prefix, _, patch in FAMILIES if model.startswith(prefix))


# --------------------------------------------------------------------------- what ran


class Observed:
    """What the training loop really did, seen through its own calls."""

    def __init__(self, monkeypatch):
        from timm.utils import ModelEmaV3

        self.models, self.optimizers, self.autocast = [], [], set()
        self.features = self.teacher = self.mixed = self.class_weights = False
        self.ema_updates = 0
        create_optimizer, total_loss, ema_update = session.create_optimizer, loop.total_loss, ModelEmaV3.update

        def backbone_called(module, args):
            self.autocast.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)

        def optimizer_seen(model, cfg):
            model.backbone.register_forward_pre_hook(backbone_called)
            self.models.append(model)
            self.optimizers.append(create_optimizer(model, cfg))
            return self.optimizers[-1]

        def loss_seen(logits, features, targets, cfg, class_weights=None):
            self.features |= features is not None
            self.teacher |= targets.teacher_probs is not None
            self.mixed |= bool((targets.labels.max(-1).values < 1 - 1e-4).any())
            self.class_weights |= class_weights is not None
            return total_loss(logits, features, targets, cfg, class_weights)

        def ema_update_seen(ema, model, step=None):
            self.ema_updates += 1
            return ema_update(ema, model, step=step)

        monkeypatch.setattr(ModelEmaV3, "update", ema_update_seen)
        monkeypatch.setattr(session, "create_optimizer", optimizer_seen)
        monkeypatch.setattr(loop, "total_loss", loss_seen)


def read_recipe_text(recipe: str) -> str:
    from importlib import resources

    return (resources.files("lowres_birds.recipes") / f"{recipe}.yaml").read_text(encoding="utf-8")


def grad_checkpointing_on(model) -> bool:
    backbone = model.backbone
    if hasattr(backbone, "set_grad_checkpointing"):  # timm
        return backbone.grad_checkpointing
    transformers_5 = hasattr(type(backbone), "is_activation_checkpointing")
    return backbone.is_activation_checkpointing if transformers_5 else backbone.is_gradient_checkpointing


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; a recipe's own starts from none and leaves none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipe_rehearsal_on_cpu(recipe, demo_data, tmp_path, monkeypatch, capsys):
    header = read_recipe_text(recipe)
    assert "\n# GPU memory" in header, (
        f"{recipe}.yaml: state the GPU memory it needs in its header (benchmarks/gpu_memory.py estimates it)"
    )
    cfg = load_config(recipe)
    strategy = parse_strategy(cfg.strategy)
    size = STAND_IN_PATCHES * patch_size(cfg.model)
    shrunk = {
        "model": stand_in(cfg.model, size, tmp_path),
        "strategy": f"{strategy.kind}:{size}" if strategy.kind != "native" else "native",
        **(
            {} if cfg.model.startswith("hf:") else {"pretrained": False}
        ),  # the hf: stand-in is a saved checkpoint, timm's have no weights
        "teacher_size": size,
        "epochs": 1,
        "batch_size": STAND_IN_BATCH,
        "device": "cpu",
        **({"folds": 2} if cfg.folds else {}),
    }
    observed = Observed(monkeypatch)
    out = tmp_path / "out"
    flags = [
        str(part)
        for key, value in shrunk.items()
        for part in (
            [f"--{'' if value else 'no-'}{key}"] if isinstance(value, bool) else [f"--{key.replace('_', '-')}", value]
        )
    ]
    assert main(["train", "--recipe", recipe, "--data", str(demo_data), "--out", str(out), *flags]) == 0
    printed = capsys.readouterr().out

    runs = FoldsDir(out).runs() if cfg.folds else [out]
    assert len(runs) == (2 if cfg.folds else 1) == len(observed.optimizers)
    steps = []
    for fold, (run_path, model, optimizer) in enumerate(zip(runs, observed.models, observed.optimizers)):
        run = RunDir(run_path)
        # Every setting but the shrunk ones is the recipe's.
        assert run.config().to_dict() == {
            **cfg.to_dict(),
            **load_config(recipe, shrunk).to_dict(),
            "fold": fold if cfg.folds else -1,
        }
        # Layer decay: learning rates that really differ by depth (the schedule scales each group's own rate).
        rates = {round(group["initial_lr"] / cfg.lr, 6) for group in optimizer.param_groups}
        assert (
            (len(rates) > 2 and min(rates) < cfg.layer_decay and max(rates) == 1.0)
            if cfg.layer_decay
            else rates == {1.0}
        )
        assert grad_checkpointing_on(model) == cfg.grad_checkpointing
        checkpoint = run.checkpoint()
        trained = 30 - len(run.split()["val_ids"])
        steps.append(checkpoint["state"]["global_step"])
        assert steps[-1] == math.ceil(math.ceil(trained / STAND_IN_BATCH) / cfg.grad_accum)  # gradient accumulation
        if cfg.ema_decay:  # the EMA's weights are evaluated and saved
            weights = run.weights()
            assert all(torch.equal(weights[name], checkpoint["ema"][f"module.{name}"]) for name in weights)
        else:
            assert checkpoint["ema"] is None
        assert (run / RunDir.DEGRADATION).is_file() == (cfg.hr_view_ratio > 0)  # HR-derived LR views
        interval = max(1, round(cfg.val_every * steps[-1]))  # validations every fraction of the epoch, and at its end
        assert [record["step"] for record in run.metrics()] == sorted(
            {*range(interval, steps[-1] + 1, interval), steps[-1]}
        )
        # the upscale filter is part of the model
        assert run.spec().get("upscale_filter", "bicubic") == cfg.upscale_filter
    assert observed.ema_updates == (sum(steps) if cfg.ema_decay else 0)  # one EMA update per optimizer step
    # the backbone ran under bf16 autocast
    assert observed.autocast == {torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32}
    assert observed.teacher == ("HR teacher " in printed) == (cfg.kd_weight > 0 or cfg.feature_kd_weight > 0)
    assert observed.features == (cfg.feature_kd_weight > 0)
    assert observed.mixed == (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
    assert observed.class_weights == (cfg.class_balanced_beta > 0)

    submission = tmp_path / "submission.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(out),
                "--ensemble",
                "f1",
                "--tta",
                "flip",
                "--data",
                str(demo_data),
                "--out",
                str(submission),
            ]
        )
        == 0
    )
    assert "weighted by validation macro-F1" in capsys.readouterr().out
    written, expected = pd.read_csv(submission), pd.read_csv(demo_data / "sample_submission.csv")
    assert list(written.columns) == ["id", "label"] and list(written["id"]) == list(expected["id"])
    assert set(written["label"]) <= set(pd.read_csv(demo_data / "train.csv")["label"])
