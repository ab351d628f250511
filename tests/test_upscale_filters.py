"""The model wrapper's resize filters: bicubic (default), Lanczos (PIL's, exactly) and ImageMagick's RobidouxSharp
cubic, one weight builder and one matmul path for all; the filter travels with the model into predict, ONNX and the
Hugging Face folder (which refuses the one it cannot state)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN
from PIL import Image

from lowres_birds.cli import main
from lowres_birds.config import RunConfig
from lowres_birds.errors import UserError
from lowres_birds.model.resolution import FILTERS, ROBIDOUX_SHARP_B, resize_uint8, resize_uint8_by_matmul
from lowres_birds.model.wrapper import ModelSpec
from lowres_birds.predict.hf_folder import load_hf_folder


def random_images(count: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)


def ours(images: np.ndarray, size: int, upscale_filter: str) -> np.ndarray:
    return resize_uint8(torch.from_numpy(images).permute(0, 3, 1, 2), size, upscale_filter).permute(0, 2, 3, 1).numpy()


def test_bicubic_is_the_default_everywhere():
    assert RunConfig().upscale_filter == "bicubic"
    assert ModelSpec("timm:x", 2, 96, (0.5,) * 3, (0.5,) * 3).upscale_filter == "bicubic"


@pytest.mark.parametrize("size", [128, 224])
def test_lanczos_is_pils_lanczos(size):
    images = random_images()
    pil = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS)) for image in images])
    difference = np.abs(ours(images, size, "lanczos").astype(int) - pil.astype(int))
    assert difference.max() <= 1
    assert not np.array_equal(ours(images, size, "lanczos"), ours(images, size, "bicubic"))


def test_robidoux_sharp_kernel_and_a_constant_image():
    kernel, support = FILTERS["robidoux-sharp"]
    assert support == 2.0
    assert kernel(0.0) == pytest.approx((6 - 2 * ROBIDOUX_SHARP_B) / 6)  # 0.9126618
    assert kernel(1.0) == pytest.approx(ROBIDOUX_SHARP_B / 6)  # 0.0436691
    assert kernel(-1.0) == kernel(1.0) and kernel(2.0) == pytest.approx(0.0) and kernel(2.5) == 0.0
    flat = torch.full((2, 3, 64, 64), 137, dtype=torch.uint8)
    for size in (128, 224, 32):
        assert torch.equal(
            resize_uint8(flat, size, "robidoux-sharp"), torch.full((2, 3, size, size), 137, dtype=torch.uint8)
        )
    images = random_images()
    sharp, bicubic = ours(images, 128, "robidoux-sharp"), ours(images, 128, "bicubic")
    assert not np.array_equal(sharp, bicubic)


@pytest.mark.parametrize("upscale_filter", ["bicubic", "lanczos", "robidoux-sharp"])
def test_every_filter_runs_through_the_one_matmul_path(upscale_filter):
    batch = torch.from_numpy(random_images(3)).permute(0, 3, 1, 2)
    assert torch.equal(resize_uint8(batch, 96, upscale_filter), resize_uint8_by_matmul(batch, 96, upscale_filter))


def test_a_spec_file_names_its_filter_and_old_ones_mean_bicubic():
    spec = {
        "source": "timm:x",
        "num_classes": 2,
        "input_size": 96,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "resize": "pil",
    }
    assert ModelSpec.from_dict(spec, ["a", "b"], "model_spec.json").upscale_filter == "bicubic"
    assert (
        ModelSpec.from_dict({**spec, "upscale_filter": "lanczos"}, ["a", "b"], "model_spec.json").upscale_filter
        == "lanczos"
    )
    with pytest.raises(UserError, match="upscale_filter 'sinc' is not one of"):
        ModelSpec.from_dict({**spec, "upscale_filter": "sinc"}, ["a", "b"], "model_spec.json")


@pytest.fixture(scope="module")
def robidoux_run(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("robidoux") / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(demo_data),
                "--out",
                str(run),
                *FAST_TRAIN,
                "--strategy",
                "upscale:80",
                "--upscale-filter",
                "robidoux-sharp",
            ]
        )
        == 0
    )
    return run


def test_the_filter_is_part_of_the_model(robidoux_run):
    from lowres_birds.model.factory import load_run_model

    assert json.loads((robidoux_run / "model_spec.json").read_text())["upscale_filter"] == "robidoux-sharp"
    model, _ = load_run_model(robidoux_run)
    batch = torch.from_numpy(random_images(2)).permute(0, 3, 1, 2)
    expected = resize_uint8(batch, 80, "robidoux-sharp").float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.spec.mean, model.spec.std))
    np.testing.assert_allclose(model.preprocess(batch), (expected - mean) / std, atol=1e-5)


def test_hf_export_refuses_robidoux_sharp_in_one_line(robidoux_run, tmp_path, capsys):
    assert not (robidoux_run / "hf").exists()  # train skipped it, saying why
    assert main(["export", "--run", str(robidoux_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "robidoux-sharp" in error and "--format onnx" in error
    assert not (tmp_path / "hf").exists()


def test_hf_folder_of_a_lanczos_run_resizes_as_the_model(winners_run):
    """timm's own transform from the folder's pretrained_cfg (what the transformers pipeline runs) sees the model's
    pixels."""
    import timm

    config = json.loads((winners_run / "hf" / "config.json").read_text())
    assert (
        config["pretrained_cfg"]["interpolation"] == "lanczos" and config["lowres_birds"]["upscale_filter"] == "lanczos"
    )
    transform = timm.data.create_transform(**timm.data.resolve_data_config(config["pretrained_cfg"]), is_training=False)
    model, _ = load_hf_folder(winners_run / "hf")
    assert model.spec.upscale_filter == "lanczos"
    images = random_images(3)
    theirs = torch.stack([transform(Image.fromarray(image)) for image in images])
    np.testing.assert_allclose(model.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2)), theirs, atol=1e-5)
