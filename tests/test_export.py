"""ONNX export: the file reproduces the PyTorch model (resize + normalisation in the graph) and refuses bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import TINY_TRAIN, write_tiny_beit_run

from lowres_birds.cli import main
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_test_table
from lowres_birds.errors import UserError
from lowres_birds.model.factory import load_run_model
from lowres_birds.model.wrapper import in_batches
from lowres_birds.predict.classifier import Classifier
from lowres_birds.predict.export import (
    FALLBACK_AGREEMENT,
    FALLBACK_FLOOR,
    FALLBACK_HEADROOM,
    file_metadata,
    held_out_images,
    top2_gap,
)


@pytest.fixture(scope="module")
def upscaled_run(demo_data, tmp_path_factory):
    """A tiny run at upscale:96, so the exported graph must contain the bicubic resize."""
    run_dir = tmp_path_factory.mktemp("export") / "run96"
    assert (
        main(["train", "--data", str(demo_data), "--out", str(run_dir), *TINY_TRAIN, "--strategy", "upscale:96"]) == 0
    )
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
    torch_probs = Classifier.load(upscaled_run).predict_arrays(demo_test_images)
    onnx_probs = Classifier.load(exported[layout]).predict_arrays(demo_test_images)
    assert onnx_probs.shape == torch_probs.shape
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    assert (onnx_probs.argmax(1) == torch_probs.argmax(1)).all()


def test_onnx_reproduces_the_runs_upscale_filter(winners_run, demo_test_images, tmp_path):
    """A run trained with --upscale-filter lanczos: the graph resizes with Lanczos, so ONNX and PyTorch agree."""
    path = tmp_path / "lanczos.onnx"
    assert main(["export", "--run", str(winners_run), "--out", str(path)]) == 0
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert (metadata["upscale_filter"], metadata["input_size"]) == ("lanczos", "96")
    onnx_probs = Classifier.load(path).predict_arrays(demo_test_images)
    np.testing.assert_allclose(onnx_probs, Classifier.load(winners_run).predict_arrays(demo_test_images), atol=1e-5)
    model, _ = load_run_model(winners_run)
    model.spec.upscale_filter = "bicubic"  # the same weights seeing bicubic pixels answer measurably otherwise
    bicubic_probs = in_batches(lambda batch: model(batch).softmax(-1), demo_test_images)
    assert np.abs(onnx_probs - bicubic_probs).max() > 1e-4


def test_predict_with_onnx_writes_the_same_submission(upscaled_run, exported, demo_data, tmp_path):
    from_run, from_onnx = tmp_path / "run.csv", tmp_path / "onnx.csv"
    assert (
        main(["predict", "--run", str(upscaled_run), "--data", str(demo_data), "--out", str(from_run), "--tta", "flip"])
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--onnx",
                str(exported["nhwc"]),
                "--data",
                str(demo_data),
                "--out",
                str(from_onnx),
                "--tta",
                "flip",
            ]
        )
        == 0
    )
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


@pytest.mark.parametrize("size", [16, 48, 96, 128, 224, 448])
def test_uint8_resize_is_the_same_on_every_path_and_pil_to_two_levels(demo_test_images, size):
    """The CPU kernel and the matrix form (GPU, ONNX) agree bit for bit, shrinking or enlarging, in any layout."""
    import torch
    from PIL import Image

    from lowres_birds.model.resolution import resize_uint8, resize_uint8_by_matmul

    batch = torch.from_numpy(demo_test_images[:6]).permute(0, 3, 1, 2)  # channels_last strides, as training gathers
    ours = resize_uint8(batch, size)
    assert ours.dtype == torch.uint8 and ours.shape == (6, 3, size, size)
    assert torch.equal(ours, resize_uint8(batch.contiguous(), size))
    assert torch.equal(ours, resize_uint8_by_matmul(batch, size))
    pil = np.stack(
        [np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)) for image in demo_test_images[:6]]
    )
    difference = np.abs(ours.permute(0, 2, 3, 1).numpy().astype(int) - pil)
    # int16 weights (PIL: 22-bit fixed point) move rare pixels by a level or two.
    assert difference.max() <= 2 and (difference > 0).mean() < 0.02


def test_a_model_spec_with_another_resize_is_refused_in_one_line(upscaled_run, tmp_path):
    import shutil

    from lowres_birds.model.factory import load_run_model

    old_run = tmp_path / "old-run"
    shutil.copytree(upscaled_run, old_run)
    spec = json.loads((old_run / "model_spec.json").read_text())
    (old_run / "model_spec.json").write_text(json.dumps({**spec, "resize": "float"}))
    with pytest.raises(UserError, match="resize 'float' is not one of pil; the run folder is damaged"):
        load_run_model(old_run)


def test_hugging_face_beit_run_exports_and_matches(tmp_path):
    """HF models export too (their SDPA attention does not with a dynamic batch: export switches it to eager)."""
    run_dir = write_tiny_beit_run(tmp_path / "beit-run", ["a", "b", "c"], use_relative_position_bias=True)
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "beit.onnx")]) == 0

    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        Classifier.load(tmp_path / "beit.onnx").predict_arrays(images),
        Classifier.load(run_dir).predict_arrays(images),
        atol=1e-4,
    )


@pytest.fixture(scope="module")
def int8_exports(upscaled_run, tmp_path_factory):
    """The run exported as int8 alone (--fallback-margin 0), with its calibrated fallback, and with every image
    falling back (margin 1): {name: path}."""
    folder = tmp_path_factory.mktemp("int8")
    paths = {name: folder / f"{name}.onnx" for name in ("alone", "calibrated", "always")}
    for name, margin in (
        ("alone", ["--fallback-margin", "0"]),
        ("calibrated", []),
        ("always", ["--fallback-margin", "1"]),
    ):
        assert main(["export", "--run", str(upscaled_run), "--out", str(paths[name]), "--int8", *margin]) == 0
    return paths


def test_int8_export_is_quantized_and_predicts_like_fp32(int8_exports, exported, demo_test_images, tmp_path):
    """export --int8: integer convolutions after onnxruntime's fusion, the same labels and layout metadata, and
    predictions close to the fp32 model (speed and accuracy on real data: benchmarks/int8.py)."""
    import onnxruntime as ort

    for name in ("alone", "calibrated"):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}-fused.onnx")
        ort.InferenceSession(str(int8_exports[name]), options, providers=["CPUExecutionProvider"])
        fused = [node.op_type for node in onnx.load(str(tmp_path / f"{name}-fused.onnx")).graph.node]
        assert fused.count("QLinearConv") >= 10
        metadata = file_metadata(int8_exports[name])
        assert metadata["precision"] == "int8" and metadata["layout"] == "nhwc"
        assert ("fallback_margin" in metadata) == (name == "calibrated")
        onnx.checker.check_model(str(int8_exports[name]))  # no metadata key twice
    fp32, int8 = Classifier.load(exported["nhwc"]), Classifier.load(int8_exports["alone"])
    assert int8.labels == fp32.labels and int8.temperature == fp32.temperature

    def plain(classifier: Classifier) -> np.ndarray:
        """The softmax before calibration: the demo run's temperature (fitted on a few images) is far below 1 and
        would magnify the int8 rounding this compares."""
        calibrated = torch.from_numpy(classifier.predict_arrays(demo_test_images))
        return calibrated.log().mul(classifier.temperature).softmax(-1).numpy()

    assert np.abs(plain(fp32) - plain(int8)).max() < 0.2


def test_int8_close_calls_are_run_again_in_float(int8_exports, exported, demo_test_images):
    """The fallback replaces exactly the rows whose int8 top-2 gap is under the margin with the fp32 network's
    probabilities and keeps the int8 ones elsewhere; margin 1 sends every image to fp32."""
    fp32 = Classifier.load(exported["nhwc"]).predict_arrays(demo_test_images)
    alone = Classifier.load(int8_exports["alone"]).predict_arrays(demo_test_images)
    margin = float(file_metadata(int8_exports["calibrated"])["fallback_margin"])
    close = top2_gap(alone) < margin
    assert 0 < close.sum() < len(close), "the demo images should hold both close and clear calls"
    cascade = Classifier.load(int8_exports["calibrated"]).predict_arrays(demo_test_images, batch_size=7)
    np.testing.assert_allclose(cascade[close], fp32[close], atol=1e-5)
    np.testing.assert_allclose(cascade[~close], alone[~close], atol=1e-6)
    np.testing.assert_allclose(
        Classifier.load(int8_exports["always"]).predict_arrays(demo_test_images), fp32, atol=1e-5
    )


def test_int8_fallback_margin_is_calibrated_on_the_validation_split(upscaled_run, int8_exports, exported):
    """The margin: FALLBACK_HEADROOM x the widest gap at which int8 and fp32 disagree on the run's validation
    images, less the widest few that FALLBACK_AGREEMENT tolerates, and at least FALLBACK_FLOOR."""
    images = held_out_images(upscaled_run)
    assert len(images) == len(json.loads((upscaled_run / "split.json").read_text())["val_ids"])
    fp32 = Classifier.load(exported["nhwc"]).predict_arrays(images)
    alone = Classifier.load(int8_exports["alone"]).predict_arrays(images)
    gaps = sorted(top2_gap(alone)[fp32.argmax(1) != alone.argmax(1)], reverse=True)
    caught = gaps[math.floor(len(images) * (1 - FALLBACK_AGREEMENT) + 1e-9) :]  # the widest ones may stay
    expected = max(FALLBACK_FLOOR, FALLBACK_HEADROOM * caught[0]) if caught else FALLBACK_FLOOR
    assert float(file_metadata(int8_exports["calibrated"])["fallback_margin"]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("flag", [["--fallback-margin", "0.1"], ["--data", "."]])
def test_int8_flags_without_int8_are_refused(upscaled_run, tmp_path, capfd, flag):
    code = main(["export", "--run", str(upscaled_run), "--out", str(tmp_path / "m.onnx"), *flag])
    err = capfd.readouterr().err
    assert code != 0 and f"{flag[0]} applies to --int8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_int8_export_of_a_run_whose_data_moved_takes_data(upscaled_run, demo_data, tmp_path, capfd):
    """int8 calibrates on the run's own images: with its data folder moved, the error names --data, which works."""
    import shutil

    run = Path(shutil.copytree(upscaled_run, tmp_path / "run"))
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    (run / "split.json").write_text(json.dumps({**split, "data": str(tmp_path / "moved")}), encoding="utf-8")
    argv = ["export", "--run", str(run), "--int8", "--fallback-margin", "0"]
    assert main([*argv, "--out", str(tmp_path / "a.onnx")]) == 2
    err = capfd.readouterr().err
    assert "which is not found; pass the run's data folder with --data" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--out", str(tmp_path / "b.onnx"), "--data", str(demo_data)]) == 0
    assert (tmp_path / "b.onnx").is_file() and not (tmp_path / "a.onnx").exists()


def test_openvino_runs_exported_files_like_onnxruntime(exported, int8_exports, demo_test_images, monkeypatch):
    """$LOWRES_BIRDS_ONNX_RUNTIME picks the runtime; unset, int8 files run on OpenVINO (faster there) and fp32 ones
    on onnxruntime. OpenVINO computes in float32, so the fp32 file gives onnxruntime's probabilities."""
    monkeypatch.delenv("LOWRES_BIRDS_ONNX_RUNTIME", raising=False)
    assert Classifier.load(exported["nhwc"]).runtime == "onnxruntime"
    assert Classifier.load(int8_exports["calibrated"]).runtime == "openvino"
    expected = {name: Classifier.load(path).predict_arrays(demo_test_images) for name, path in exported.items()}
    monkeypatch.setenv("LOWRES_BIRDS_ONNX_RUNTIME", "openvino")
    for name, path in exported.items():
        classifier = Classifier.load(path)
        assert classifier.runtime == "openvino"
        np.testing.assert_allclose(classifier.predict_arrays(demo_test_images, batch_size=5), expected[name], atol=1e-4)
    monkeypatch.setenv("LOWRES_BIRDS_ONNX_RUNTIME", "onnxruntime")
    assert Classifier.load(int8_exports["calibrated"]).runtime == "onnxruntime"


def test_unknown_onnx_runtime_is_refused_in_one_line(exported, demo_data, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LOWRES_BIRDS_ONNX_RUNTIME", "tensorrt")
    code = main(
        ["predict", "--onnx", str(exported["nhwc"]), "--data", str(demo_data), "--out", str(tmp_path / "s.csv")]
    )
    err = capfd.readouterr().err.strip()
    assert code != 0 and "LOWRES_BIRDS_ONNX_RUNTIME='tensorrt' is not a runtime" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.csv").exists()
