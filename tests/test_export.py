"""ONNX export: the file reproduces the PyTorch model (resize + normalisation in the graph) and refuses bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest

from lowres_birds.cli import main
from lowres_birds.data import load_images, load_test_table
from lowres_birds.inference import Classifier
from conftest import TINY_TRAIN


@pytest.fixture(scope="module")
def upscaled_run(demo_data, tmp_path_factory):
    """A tiny run at upscale:96, so the exported graph must contain the bicubic resize."""
    run_dir = tmp_path_factory.mktemp("export") / "run96"
    assert main(["train", "--data", str(demo_data), "--out", str(run_dir), *TINY_TRAIN, "--strategy", "upscale:96"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def demo_test_images(demo_data):
    return np.asarray(load_images(load_test_table(demo_data).lr_paths, 64))


@pytest.fixture(scope="module")
def exported(upscaled_run, tmp_path_factory):
    """The run exported once per layout through the CLI: {layout: path}."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {layout: folder / f"{layout}.onnx" for layout in ("nhwc", "nchw")}
    for layout, path in paths.items():
        assert main(["export", "--run", str(upscaled_run), "--out", str(path), "--layout", layout]) == 0
    return paths


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_onnx_matches_pytorch(upscaled_run, exported, demo_test_images, layout):
    model = onnx.load(str(exported[layout]))
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["labels"]) == json.loads((upscaled_run / "labels.json").read_text())
    assert (metadata["input_size"], metadata["layout"]) == ("96", layout)
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == (["batch", 64, 64, 3] if layout == "nhwc" else ["batch", 3, 64, 64])
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in resize.attribute}
    assert (attributes["mode"], attributes["cubic_coeff_a"], attributes["antialias"]) == (b"cubic", -0.5, 1)

    torch_probs = Classifier.load(upscaled_run).predict_arrays(demo_test_images)
    onnx_probs = Classifier.load(exported[layout]).predict_arrays(demo_test_images)
    assert onnx_probs.shape == torch_probs.shape
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    assert (onnx_probs.argmax(1) == torch_probs.argmax(1)).all()


def test_predict_with_onnx_writes_the_same_submission(upscaled_run, exported, demo_data, tmp_path):
    from_run, from_onnx = tmp_path / "run.csv", tmp_path / "onnx.csv"
    assert main(["predict", "--run", str(upscaled_run), "--data", str(demo_data), "--out", str(from_run), "--tta", "flip"]) == 0
    assert main(["predict", "--onnx", str(exported["nhwc"]), "--data", str(demo_data), "--out", str(from_onnx), "--tta", "flip"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(from_run), pd.read_csv(from_onnx))


def test_export_refuses_bad_input(upscaled_run, tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not a finished run" in capsys.readouterr().err
    assert main(["export", "--run", str(upscaled_run), "--out", str(tmp_path / "m.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    (tmp_path / "taken.onnx").write_bytes(b"")
    assert main(["export", "--run", str(upscaled_run), "--out", str(tmp_path / "taken.onnx")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--run", str(upscaled_run), "--layout", "nwhc"]) == 2
    assert main(["export", "--run", str(upscaled_run), "--format", "tflite"]) == 2


@pytest.mark.parametrize("size", [128, 224])
def test_in_model_resize_matches_pil_bicubic_in_either_memory_format(demo_test_images, size):
    """The resize the ONNX graph reproduces is PIL's bicubic, also on channels_last batches (the fast-path copy)."""
    import torch
    from PIL import Image

    from lowres_birds.resolution import resize_batch

    batch = torch.from_numpy(demo_test_images[:4]).permute(0, 3, 1, 2)  # channels_last strides, as training gathers
    assert batch.is_contiguous(memory_format=torch.channels_last)
    ours = resize_batch(batch.float() / 255, size)
    assert torch.equal(ours, resize_batch(batch.contiguous().float() / 255, size))
    pil = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)) for image in demo_test_images[:4]])
    difference = np.abs(ours.permute(0, 2, 3, 1).numpy() * 255 - pil)
    # PIL rounds (and clips) to uint8 after each pass, so rare pixels at sharp edges differ by a few levels.
    assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 1.0


def test_hugging_face_beit_run_exports_and_matches(tmp_path):
    """HF models export too (their SDPA attention does not with a dynamic batch: export switches it to eager)."""
    from safetensors.torch import save_file
    from transformers import BeitConfig

    from lowres_birds.data import LabelMap
    from lowres_birds.models import create_model, save_architecture

    config_dir, run_dir = tmp_path / "beit-config", tmp_path / "beit-run"
    BeitConfig(image_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, use_relative_position_bias=True).save_pretrained(config_dir)
    labels = ["a", "b", "c"]
    model = create_model(f"hf:{config_dir}", labels, 96, pretrained=False)
    run_dir.mkdir()
    save_architecture(model, run_dir)
    LabelMap(tuple(labels)).save(run_dir / "labels.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "beit.onnx")]) == 0

    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(Classifier.load(tmp_path / "beit.onnx").predict_arrays(images), Classifier.load(run_dir).predict_arrays(images), atol=1e-4)
