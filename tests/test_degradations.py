"""Issue 26: the randomised degradation family of the HR views, its validation, and the robustness grid."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST_TRAIN
from PIL import Image, ImageFilter

from lowres_birds.cli import main
from lowres_birds.config import (
    DEGRADATION_GRIDS,
    DegradationFamily,
    load_config,
    parse_degradation_grid,
    parse_degradations,
)
from lowres_birds.data.degradations import Chain, degrade_randomly, draw_chains, resize_chain
from lowres_birds.data.demo import draw_bird
from lowres_birds.errors import UserError
from lowres_birds.run_dir import RunDir
from lowres_birds.train.batches import hr_views


@pytest.fixture(scope="module")
def bird() -> Image.Image:
    return draw_bird(2, np.random.default_rng(7))


def through_family(image: Image.Image, family: DegradationFamily, seed: int = 0) -> np.ndarray:
    batch = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    out = degrade_randomly(batch, family, torch.Generator().manual_seed(seed))
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 64, 64)
    return out[0].permute(1, 2, 0).numpy()


def jpeg(image: Image.Image, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_the_family_is_deterministic_for_a_seed_and_varies_with_it():
    images = torch.from_numpy(np.stack([np.asarray(draw_bird(i % 3, np.random.default_rng(i))) for i in range(6)]))
    images = images.permute(0, 3, 1, 2)
    family = parse_degradations("default")
    first = degrade_randomly(images, family, torch.Generator().manual_seed(5))
    again = degrade_randomly(images, family, torch.Generator().manual_seed(5))
    other = degrade_randomly(images, family, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    "kernel, reference",
    [
        ("box", lambda im: im.resize((64, 64), Image.Resampling.BOX)),
        ("bilinear", lambda im: im.resize((64, 64), Image.Resampling.BILINEAR)),
        ("bicubic", lambda im: im.resize((64, 64), Image.Resampling.BICUBIC)),
        ("lanczos", lambda im: im.resize((64, 64), Image.Resampling.LANCZOS)),
        ("nearest", lambda im: im.resize((64, 64), Image.Resampling.NEAREST)),
        ("area", lambda im: im.reduce(4)),
    ],
)
def test_each_kernel_is_pils(kernel, reference, bird):
    expected = np.asarray(reference(bird))
    np.testing.assert_array_equal(through_family(bird, DegradationFamily(kernels=(kernel,))), expected)
    if kernel != "bicubic":  # and it is not one kernel for all
        bicubic = np.asarray(bird.resize((64, 64), Image.Resampling.BICUBIC))
        assert not np.array_equal(expected, bicubic)


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_each_jpeg_quality_is_pils(quality, bird):
    small = bird.resize((64, 64), Image.Resampling.BICUBIC)
    out = through_family(bird, DegradationFamily(jpeg=(quality, quality)))
    np.testing.assert_array_equal(out, jpeg(small, quality))
    assert not np.array_equal(out, np.asarray(small))


def test_blur_is_pils_gaussian_in_lr_pixels_and_noise_has_its_std(bird):
    blurred = bird.filter(ImageFilter.GaussianBlur(0.5 * 4)).resize((64, 64), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(through_family(bird, DegradationFamily(blur=(0.5, 0.5))), np.asarray(blurred))
    clean = through_family(bird, DegradationFamily()).astype(float)
    noisy = through_family(bird, DegradationFamily(noise=(6.0, 6.0))).astype(float)
    assert 5.0 < (noisy - clean).std() < 7.0


def test_a_crop_is_pils_box_resize_and_hr_views_with_a_family_are_reproducible(bird):
    chain = Chain("lanczos", 0.0, 0.0, 0)
    expected = bird.resize((64, 64), Image.Resampling.LANCZOS, box=(20, 10, 220, 210))
    np.testing.assert_array_equal(np.asarray(resize_chain(bird, chain, 64, (10, 20, 200))), np.asarray(expected))
    images = torch.from_numpy(np.array(bird)).permute(2, 0, 1)[None].repeat(4, 1, 1, 1)
    family = parse_degradations("default")
    views = [hr_views(images, family, 0.5, 0, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert views[0].shape == (4, 3, 64, 64) and torch.equal(views[0], views[1])
    assert not torch.equal(views[0][0], views[0][1])  # each view its own crop, flip and chain


def test_chains_are_drawn_within_the_family_ranges():
    family = parse_degradations("kernels=box+lanczos,blur=0.2:0.6,jpeg=40:50,noise=1:3")
    chains = draw_chains(family, 400, torch.Generator().manual_seed(0))
    assert {c.kernel for c in chains} == {"box", "lanczos"}
    assert all(0.2 <= c.blur_sigma <= 0.6 and 1 <= c.noise_std <= 3 for c in chains)
    assert {c.jpeg_quality for c in chains} == set(range(40, 51))
    assert all(c.jpeg_quality == 0 for c in draw_chains(DegradationFamily(), 5, torch.Generator()))


def test_named_families_and_grids_parse():
    assert parse_degradations("none") is None
    assert str(parse_degradations("default")).startswith("kernels=box+bilinear+bicubic+lanczos+area")
    spec = "kernels=lanczos,blur=0:0.6,jpeg=40:95,noise=0:4"
    assert str(parse_degradations(spec)) == spec  # the spec prints as it parses
    cells = parse_degradation_grid("default")
    assert len(cells) >= 12 and len(set(cells)) == len(cells)
    assert all(len(c.kernels) == 1 and c.blur[0] == c.blur[1] for c in cells)
    assert "default" in DEGRADATION_GRIDS
    with pytest.raises(UserError, match="points"):
        parse_degradation_grid("blur=0:1")


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("sideways", "neither a named one"),
        ("kernels=gauss", "kernels must be distinct ones of box"),
        ("kernels=box+box", "kernels must be distinct"),
        ("blur=1:0.5", "blur=1:0.5 must lie between 0 and 5"),
        ("blur=nan", "must lie between"),
        ("noise=0:inf", "must lie between"),
        ("kernels=box,blur=0:9", "blur=0:9 must lie between 0 and 5"),
        ("jpeg=0:90", "jpeg=0:90 must lie between 1 and 100"),
        ("jpeg=40.5:90", "whole qualities"),
        ("noise=-1", "noise=-1 must lie between 0 and 64"),
        ("noise=a", "must be a number or a range"),
        ("blur=0+1", "not a '+' list"),
        ("blur=1,blur=2", "each once"),
    ],
)
def test_bad_families_are_refused_in_one_line(value, fragment):
    with pytest.raises(UserError, match="degradations") as refused:
        load_config("cpu", {"degradations": value, "hr_view_ratio": 0.3})
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_a_family_without_views_is_refused():
    with pytest.raises(UserError, match="set --hr-view-ratio above 0"):
        load_config("cpu", {"degradations": "default", "hr_view_ratio": 0})
    assert load_config("cpu", {"degradations": "light", "hr_view_ratio": 0.3}).degradations == "light"


def test_the_cpu_recipe_trains_on_degraded_hr_views_and_one_flag_turns_them_off():
    cpu = load_config("cpu")
    assert (cpu.hr_view_ratio, cpu.degradations) == (0.3, "default")
    off = load_config("cpu", {"hr_view_ratio": 0})
    assert (off.hr_view_ratio, off.degradations) == (0, "none")


def test_training_with_the_family_and_the_lr_only_fallback(demo_data, tmp_path, capsys):
    flags = [*FAST_TRAIN, "--hr-view-ratio", "0.5", "--degradations", "default"]
    assert main(["train", "--data", str(demo_data), "--out", str(tmp_path / "run"), *flags]) == 0
    assert "randomised degradations: 0.5 of each batch, HR views, kernels=box+bilinear" in capsys.readouterr().out
    assert not (tmp_path / "run" / RunDir.DEGRADATION).exists()  # no chain fitted: the family replaces it
    data = tmp_path / "data"
    shutil.copytree(demo_data, data, ignore=shutil.ignore_patterns("upscale_train"))
    pd.read_csv(data / "train.csv").drop(columns=["upscale_img_path"]).to_csv(data / "train.csv", index=False)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "lr-only"), *flags]) == 0
    out = capsys.readouterr().out
    assert "LR images mildly blurred or compressed" in out and "0.5 of each batch, LR images (no twins)" in out
    assert RunDir(tmp_path / "lr-only").config().hr_view_ratio == 0.5


def test_evaluate_degradations_scores_a_run_on_its_validation_twins(trained_run, tmp_path, capsys):
    grid = "kernels=box+lanczos,blur=0+0.5,jpeg=none+50,noise=0"
    assert main(["evaluate", "--run", str(trained_run), "--degradations", grid, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "robustness.csv")
    assert len(table) == 1 + 8 and table["degradation"].iloc[0] == "real LR validation images"
    np.testing.assert_allclose(table["drop"], table["macro_f1"].iloc[0] - table["macro_f1"])
    assert "over 8 other degradations: mean drop" in out
    assert set(RunDir(trained_run).split()["val_ids"])  # scored on the validation split the run recorded


def test_evaluate_degradations_refuses_a_bad_grid_and_several_runs(trained_run, tmp_path, capfd):
    assert main(["evaluate", "--run", str(trained_run), "--degradations", "jpeg=0", "--out-dir", str(tmp_path)]) == 2
    assert capfd.readouterr().err.strip() == (
        "error: degradation grid 'jpeg=0': jpeg=0 must lie between 1 and 100, low <= high (whole qualities)"
    )
    two = ["--run", str(trained_run), "--run", str(trained_run)]
    assert main(["evaluate", *two, "--degradations", "default", "--out-dir", str(tmp_path)]) == 2
    assert "pass exactly one --run RUN" in capfd.readouterr().err


def test_evaluate_degradations_needs_the_twins(trained_run, demo_data, tmp_path, capfd):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data, ignore=shutil.ignore_patterns("upscale_train"))
    pd.read_csv(data / "train.csv").drop(columns=["upscale_img_path"]).to_csv(data / "train.csv", index=False)
    argv = ["evaluate", "--run", str(trained_run), "--data", str(data), "--degradations", "default"]
    assert main([*argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: the robustness grid degrades the validation images' high-res twins, but ")
    assert len(err.splitlines()) == 1 and not (tmp_path / "out" / "robustness.csv").exists()
