"""Broken and awkward inputs: each one has one exact outcome through the CLI (tests/test_corpus.py adds the
systematic grids: output paths, numeric flags, damaged run folders, full disk).

Refused inputs exit 2 with one ``error:`` line naming the file/row/option, before any training starts
(no metrics.jsonl). Awkward but usable inputs (odd image modes, CSV dialects, non-ASCII labels,
symlinks, odd sizes) are accepted, converted, and round-trip to labels.json and the submission.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TRAIN
from PIL import Image

from lowres_birds.cli import main
from lowres_birds.data.demo import make_demo_dataset
from lowres_birds.data.images import decode_image
from lowres_birds.data.tables import load_test_table, load_train_table
from lowres_birds.run_dir import MARKER, RunDir

FAST_MODEL = ["--model", "timm:test_efficientnet", "--no-pretrained", "--strategy", "native", "--device", "cpu"]
TINY = [*FAST_MODEL, "--epochs", "1", "--batch-size", "16"]
# Awkward class names: Korean, a comma, a double quote, a semicolon (the CSV below uses ';' as separator).
AWKWARD_LABELS = {"Azure Finch": "물총새", "Crimson Tanager": "Heron, Great", "Golden Warbler": 'Owl "Barn"; Tyto'}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def base_data(tmp_path_factory) -> Path:
    """2 species x 4 training images, 2 x 2 test images; each test copies it before breaking one thing."""
    return make_demo_dataset(tmp_path_factory.mktemp("base") / "data", train_per_class=4, test_per_class=2, classes=2)


@pytest.fixture
def data(base_data, tmp_path) -> Path:
    return Path(shutil.copytree(base_data, tmp_path / "data"))


def run_cli(args: list[str], capfd) -> tuple[int, str]:
    """(exit code, stderr) of one in-process CLI call."""
    code = main([str(a) for a in args])
    return code, capfd.readouterr().err


def assert_refused(code: int, err: str, *fragments: str) -> None:
    """Exit 2 and exactly one 'error:' line that contains every fragment."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def edit_csv(path: Path, change) -> None:
    """Rewrite a CSV through ``change(frame) -> frame``."""
    change(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height pixels, then IEND: Pillow reads the size at open."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def quadrants(width: int = 64, height: int = 48) -> np.ndarray:
    """Four flat colours (JPEG keeps them nearly exact) so a rotation is unmistakable."""
    array = np.zeros((height, width, 3), np.uint8)
    array[: height // 2, : width // 2] = (250, 0, 0)
    array[: height // 2, width // 2 :] = (0, 250, 0)
    array[height // 2 :, : width // 2] = (0, 0, 250)
    array[height // 2 :, width // 2 :] = (250, 250, 0)
    return array


# --------------------------------------------------------------------------- image files


def write_cmyk(path: Path) -> None:
    path.write_bytes(jpeg_bytes(Image.new("CMYK", (64, 64), (0, 255, 255, 0))))


def write_png16(path: Path) -> None:
    Image.fromarray(np.full((64, 64), 100 * 257, np.uint16)).save(path, "PNG")


def write_rgba(path: Path) -> None:
    array = np.zeros((64, 64, 4), np.uint8)
    array[:, 32:] = (200, 10, 10, 255)  # right half opaque red, left half fully transparent
    Image.fromarray(array, "RGBA").save(path, "PNG")


def write_palette(path: Path) -> None:
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.save(path, "PNG")


def write_gray(path: Path) -> None:
    Image.new("L", (64, 64), 77).save(path, "PNG")


def write_exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    path.write_bytes(jpeg_bytes(Image.fromarray(quadrants()), exif=exif))


def write_odd_size(path: Path) -> None:
    Image.new("RGB", (80, 50), (30, 60, 90)).save(path, "JPEG", quality=95)


def write_gif(path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 255, 255), (0, 0, 0))]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:])


def write_png_named_jpg(path: Path) -> None:
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path, "PNG")


ACCEPTED_IMAGES = {
    "cmyk-jpeg": (write_cmyk, lambda a: a.shape == (64, 64, 3) and np.abs(a.astype(int) - (255, 0, 0)).max() <= 8),
    "16-bit-png": (write_png16, lambda a: a.shape == (64, 64, 3) and (a == 100).all()),
    "rgba-png": (write_rgba, lambda a: (a[:, :32] == 255).all() and (a[:, 32:] == (200, 10, 10)).all()),
    "palette-png": (write_palette, lambda a: (a == (10, 20, 30)).all()),
    "grayscale-png": (write_gray, lambda a: a.shape == (64, 64, 3) and (a == 77).all()),
    "odd-size-jpeg": (write_odd_size, lambda a: a.shape == (50, 80, 3)),
    "animated-gif": (write_gif, lambda a: a.shape == (64, 64, 3) and (a == 255).all()),
    "png-named-jpg": (write_png_named_jpg, lambda a: (a == (1, 2, 3)).all()),
}


@pytest.mark.parametrize("kind", ACCEPTED_IMAGES)
def test_awkward_image_modes_decode_to_rgb(kind, tmp_path):
    write, expected = ACCEPTED_IMAGES[kind]
    path = tmp_path / "image.jpg"
    write(path)
    array = decode_image(path)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert expected(array), f"{kind}: unexpected pixels {array.reshape(-1, 3)[:2]}"


def test_exif_orientation_is_applied(tmp_path):
    rotated, plain = tmp_path / "rotated.jpg", tmp_path / "plain.jpg"
    write_exif_rotated(rotated)
    plain.write_bytes(jpeg_bytes(Image.fromarray(quadrants())))  # same pixels, no orientation tag
    decoded, upright = decode_image(rotated), decode_image(plain)
    assert upright.shape == (48, 64, 3) and decoded.shape == (64, 48, 3)
    np.testing.assert_array_equal(decoded, np.rot90(upright, k=-1))  # 90 degrees clockwise


BROKEN_IMAGES = {
    "zero-byte": (lambda p: p.write_bytes(b""), "not a readable image"),
    "truncated-jpeg": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable image"),
    "text-named-jpg": (lambda p: p.write_text("id,label\nnot,an image\n"), "not a readable image"),
    "png-100k-x-100k": (lambda p: p.write_bytes(png_header_only(100_000, 100_000)), "refused as a decompression bomb"),
}


@pytest.mark.parametrize("kind", BROKEN_IMAGES)
def test_broken_training_image_is_refused_naming_the_file(kind, data, tmp_path, capfd):
    corrupt, message = BROKEN_IMAGES[kind]
    corrupt(data / "train" / "TRAIN_00003.jpg")
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "TRAIN_00003.jpg", message)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- training table


def set_cell(row: int, column: str, value: str):
    """A CSV change that puts ``value`` in one cell."""

    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame

    return change


BROKEN_TABLES = {
    "missing-column": (lambda f: f.drop(columns=["label"]), ["train.csv", "missing column(s) label"]),
    "duplicate-id": (set_cell(2, "id", "TRAIN_00001"), ["train.csv row 4", "duplicate id 'TRAIN_00001'"]),
    "empty-label": (set_cell(1, "label", ""), ["train.csv row 3", "empty label"]),
    "empty-id": (set_cell(3, "id", "  "), ["train.csv row 5", "empty id"]),
    "class-with-one-image": (set_cell(0, "label", "Lonely Bird"), ["class 'Lonely Bird' has only 1 image"]),
    "one-class": (lambda f: f.assign(label="Same"), ["every image is labelled 'Same'", "at least 2 classes"]),
    "path-escaping-data-folder": (
        set_cell(0, "img_path", "../../etc/passwd"),
        ["train.csv row 2", "'../../etc/passwd' points outside the data folder; refused"],
    ),
    "absolute-path": (
        set_cell(0, "img_path", "/etc/passwd"),
        ["train.csv row 2", "'/etc/passwd' points outside the data folder; refused"],
    ),
}


@pytest.mark.parametrize("kind", BROKEN_TABLES)
def test_broken_train_csv_is_refused_naming_the_row(kind, data, tmp_path, capfd):
    change, fragments = BROKEN_TABLES[kind]
    edit_csv(data / "train.csv", change)
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, *fragments)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_directory_where_an_image_should_be(data, tmp_path, capfd):
    image = data / "train" / "TRAIN_00002.jpg"
    image.unlink()
    image.mkdir()
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "1 file(s) in column img_path missing or not regular files", "TRAIN_00002.jpg")


def test_missing_image_file(data, tmp_path, capfd):
    (data / "train" / "TRAIN_00005.jpg").unlink()
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "column img_path missing", "TRAIN_00005.jpg")


def test_hr_strategy_without_high_res_column(data, tmp_path, capfd):
    edit_csv(data / "train.csv", lambda f: f.drop(columns=["upscale_img_path"]))
    args = ["train", "--data", data, "--out", tmp_path / "run", *TINY, "--strategy", "hr-downscale:64"]
    code, err = run_cli(args, capfd)
    assert_refused(code, err, "hr-downscale:64", "no upscale_img_path column")


def test_train_csv_not_utf8(data, tmp_path, capfd):
    text = (data / "train.csv").read_text(encoding="utf-8").replace("Azure Finch", "Pinson bleu é")
    (data / "train.csv").write_bytes(text.encode("latin-1"))
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "train.csv is not UTF-8 text")


def test_train_csv_empty(data, tmp_path, capfd):
    (data / "train.csv").write_bytes(b"")
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "train.csv could not be read as CSV")


def test_competition_folder_without_train_csv_is_not_an_image_folder(data, tmp_path, capfd):
    (data / "train.csv").unlink()  # train/, test/, upscale_train/ must not become three "classes"
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "train.csv not found")


def test_data_folder_missing(tmp_path, capfd):
    code, err = run_cli(["train", "--data", tmp_path / "nowhere", "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "data folder", "nowhere", "not found")


def test_too_few_images_for_the_split(data, tmp_path, capfd):
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY, "--val-fraction", "0.9"], capfd)
    assert_refused(code, err, "8 images are too few for a stratified validation split over 2 classes")


def test_image_folder_with_a_corrupt_image(data, tmp_path, capfd):
    folder = tmp_path / "folders"
    for species in ("finch", "robin"):
        (folder / species).mkdir(parents=True)
        for index in range(3):
            shutil.copy(data / "train" / f"TRAIN_0000{index}.jpg", folder / species / f"{index}.jpg")
    (folder / "robin" / "1.jpg").write_bytes(b"")
    code, err = run_cli(["train", "--data", folder, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "robin/1.jpg", "not a readable image")


# --------------------------------------------------------------------------- options and recipes


BAD_OPTIONS = {
    "negative-epochs": (["--epochs", "-1"], ["--epochs must be at least 1 (got -1)"]),
    "batch-size-0": (["--batch-size", "0"], ["--batch-size must be at least 1 (got 0)"]),
    "epochs-not-a-number": (["--epochs", "abc"], ["--epochs", "'abc'"]),
    "unknown-strategy": (["--strategy", "sideways"], ["unknown strategy 'sideways'"]),
    "strategy-size-not-a-number": (["--strategy", "upscale:big"], ["'upscale:big'", "whole number"]),
    "zero-learning-rate": (["--lr", "0"], ["--lr must be positive"]),
    "val-fraction-above-1": (["--val-fraction", "1.5"], ["--val-fraction must be between 0 and 1"]),
    "unknown-schedule": (["--schedule", "zigzag"], ["schedule must be one of constant, cosine"]),
    "unknown-degradations": (
        ["--degradations", "sideways", "--hr-view-ratio", "0.3"],
        ["degradations 'sideways'", "neither a named one"],
    ),
    "degradations-jpeg-out-of-range": (
        ["--degradations", "jpeg=0:90", "--hr-view-ratio", "0.3"],
        ["jpeg=0:90 must lie between 1 and 100"],
    ),
    "degradations-without-hr-views": (
        ["--degradations", "default", "--hr-view-ratio", "0"],
        ["set --hr-view-ratio above 0"],
    ),
    "unknown-keep": (["--keep", "newest"], ["keep must be one of best, last"]),
    "keep-last-with-patience": (
        ["--keep", "last", "--early-stop-patience", "2"],
        ["keep last with early_stop_patience 2", "drop one of them"],
    ),
    "unknown-option": (["--bogus", "1"], ["unrecognized arguments: --bogus"]),
    "unknown-recipe": (["--recipe", "turbo"], ["unknown recipe 'turbo'"]),
    "unknown-model-source": (["--model", "resnet50"], ["unknown model 'resnet50'"]),
    "unknown-timm-model": (["--model", "timm:not_a_model"], ["unknown timm model 'not_a_model'"]),
    "hf-path-not-a-directory": (
        ["--model", "hf:/no/such/dir"],
        ["/no/such/dir is neither a local directory nor a Hugging Face Hub id"],
    ),
}


@pytest.mark.parametrize("kind", BAD_OPTIONS)
def test_bad_option_is_refused_naming_it(kind, data, tmp_path, capfd):
    extra, fragments = BAD_OPTIONS[kind]
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY, *extra], capfd)
    assert_refused(code, err, *fragments)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_recipe_with_unknown_key(data, tmp_path, capfd):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("epochs: 1\nepochz: 3\n", encoding="utf-8")
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--recipe", recipe], capfd)
    assert_refused(code, err, "mine.yaml", "unknown key(s) epochz")


def test_recipe_not_yaml(data, tmp_path, capfd):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("epochs: [1\n", encoding="utf-8")
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--recipe", recipe], capfd)
    assert_refused(code, err, "broken.yaml is not valid YAML")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_requested_without_gpu(data, tmp_path, capfd):
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY, "--device", "cuda"], capfd)
    assert_refused(code, err, "--device cuda", "no CUDA GPU is visible")


def test_out_is_an_existing_file(data, tmp_path, capfd):
    (tmp_path / "run").write_text("not a folder")
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY], capfd)
    assert_refused(code, err, "run", "is a file")


def test_resume_without_checkpoint(data, tmp_path, capfd):
    (tmp_path / "run").mkdir()
    code, err = run_cli(["train", "--resume", tmp_path / "run", "--data", data], capfd)
    assert_refused(code, err, "has no checkpoint.pt to resume from")


def test_unknown_hub_model_fails_fast_offline(data, tmp_path, capfd, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = run_cli(
        ["train", "--data", data, "--out", tmp_path / "run", *TINY, "--model", "hf:does-not-exist/xyz"], capfd
    )
    assert_refused(code, err, "'hf:does-not-exist/xyz' is not in the Hugging Face cache and HF_HUB_OFFLINE is set")


def test_unknown_hub_model_without_offline_mode_does_not_retry(data, tmp_path, capfd, monkeypatch):
    """Online: the Hub says the repository does not exist; offline: it is unreachable. Either way, one line, no
    retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    code, err = run_cli(
        ["train", "--data", data, "--out", tmp_path / "run", *TINY, "--model", "hf:does-not-exist/xyz"], capfd
    )
    assert_refused(code, err, "'hf:does-not-exist/xyz'")
    assert "no such model on the Hugging Face Hub" in err or "the Hugging Face Hub is unreachable" in err


# --------------------------------------------------------------------------- accepted inputs


def awkward_layout(source: Path, out: Path) -> Path:
    """A copy of ``source`` whose CSVs use BOM + CRLF + ';' + an extra column, with awkward labels,
    one symlinked training image, one 80x50 training image and awkward test images."""
    data = Path(shutil.copytree(source, out))
    train = pd.read_csv(data / "train.csv", dtype=str)
    train["label"] = train["label"].map(AWKWARD_LABELS)
    train["photographer"] = "Kim, J."
    linked = data / "train" / "TRAIN_00000.jpg"
    linked.rename(data / "original.jpg")
    linked.symlink_to(data / "original.jpg")
    write_odd_size(data / "train" / "TRAIN_00001.jpg")
    write_dialect(train, data / "train.csv")
    test = pd.read_csv(data / "test.csv", dtype=str).assign(notes="x")
    writers = [
        write_cmyk,
        write_png16,
        write_rgba,
        write_palette,
        write_gray,
        write_exif_rotated,
        write_odd_size,
        write_gif,
        write_png_named_jpg,
    ]
    for writer, relative in zip(writers, test["img_path"]):
        writer(data / relative)
    write_dialect(test, data / "test.csv")
    truth = pd.read_csv(data / "test_labels.csv", dtype=str)
    truth.assign(label=truth["label"].map(AWKWARD_LABELS)).to_csv(data / "test_labels.csv", index=False)
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str)
    sample.iloc[::-1].to_csv(data / "sample_submission.csv", index=False)  # the submission follows this order
    return data


def write_dialect(frame: pd.DataFrame, path: Path) -> None:
    text = frame.to_csv(index=False, sep=";", lineterminator="\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> tuple[Path, Path, list]:
    """(data, trained run, warnings) for a 3-class awkward layout, trained once for one epoch."""
    root = tmp_path_factory.mktemp("awkward")
    source = make_demo_dataset(root / "clean", train_per_class=4, test_per_class=3, classes=3)
    data = awkward_layout(source, root / "data")
    with pytest.MonkeyPatch.context() as patch, pytest.warns(UserWarning) as caught:
        patch.setenv("LOWRES_BIRDS_CACHE", str(tmp_path_factory.getbasetemp() / "image-cache"))
        assert main(["train", "--data", str(data), "--out", str(root / "run"), *TINY]) == 0
    return data, root / "run", [str(w.message) for w in caught]


def test_awkward_training_data_is_accepted_with_one_size_warning(awkward):
    data, run, caught = awkward
    size_warnings = [m for m in caught if "were not 64x64" in m]
    assert size_warnings == ["1 of 12 images were not 64x64; resized to 64x64 (bicubic)"]
    assert (run / "model.safetensors").is_file()


def test_non_ascii_and_comma_labels_round_trip_through_labels_json(awkward):
    _, run, _ = awkward
    expected = sorted(AWKWARD_LABELS.values())
    assert RunDir(run).labels() == expected
    assert "물총새" in (run / "labels.json").read_text(encoding="utf-8")  # stored readable, not \\u-escaped


def test_awkward_test_images_and_csv_dialect_predict_in_sample_order(awkward, tmp_path, capfd):
    data, run, _ = awkward
    submission, probabilities = tmp_path / "submission.csv", tmp_path / "probs.csv"
    with pytest.warns(UserWarning, match="2 of 9 images were not 64x64"):  # the 80x50 one and the rotated 64x48 one
        code, err = run_cli(
            ["predict", "--run", run, "--data", data, "--out", submission, "--probs", probabilities], capfd
        )
    assert code == 0, err
    written = pd.read_csv(submission, dtype=str, keep_default_na=False)
    assert list(written.columns) == ["id", "label"]
    assert pd.read_csv(probabilities).columns.tolist() == [
        "id",
        *sorted(AWKWARD_LABELS.values()),
        "unknown",
        "unknown_score",
    ]
    assert written["id"].tolist() == pd.read_csv(data / "sample_submission.csv", dtype=str)["id"].tolist()
    assert set(written["label"]) <= set(AWKWARD_LABELS.values())
    code, err = run_cli(
        ["evaluate", "--submission", submission, "--labels", data / "test_labels.csv", "--data", data], capfd
    )
    assert code == 0, err


@pytest.mark.parametrize("dialect", ["bom", "crlf", "semicolon", "extra-column", "padded-values"])
def test_csv_dialects_read_like_the_plain_file(dialect, base_data, tmp_path):
    data = Path(shutil.copytree(base_data, tmp_path / "data"))
    frame = pd.read_csv(data / "train.csv", dtype=str)
    text = {
        "bom": "\ufeff" + frame.to_csv(index=False),
        "crlf": frame.to_csv(index=False, lineterminator="\r\n"),
        "semicolon": frame.to_csv(index=False, sep=";"),
        "extra-column": frame.assign(notes="a, b").to_csv(index=False),
        "padded-values": frame.apply(lambda column: " " + column + " ").to_csv(index=False),
    }[dialect]
    (data / "train.csv").write_text(text, encoding="utf-8", newline="")
    plain, read = load_train_table(base_data), load_train_table(data)
    assert (read.ids, read.labels) == (plain.ids, plain.labels)
    assert [p.relative_to(data) for p in read.lr_paths] == [p.relative_to(base_data) for p in plain.lr_paths]


def test_symlinked_data_folder_is_accepted(base_data, tmp_path):
    link = tmp_path / "linked"
    link.symlink_to(base_data, target_is_directory=True)
    assert load_train_table(link).ids == load_train_table(base_data).ids


# --------------------------------------------------------------------------- test set


def test_test_id_absent_from_sample_submission(awkward, data, tmp_path, capfd):
    _, run, _ = awkward
    edit_csv(data / "sample_submission.csv", lambda f: f.drop(index=1))
    code, err = run_cli(["predict", "--run", run, "--data", data, "--out", tmp_path / "s.csv"], capfd)
    assert_refused(code, err, "test.csv: 1 id(s) absent from sample_submission.csv (first: TEST_00001)")
    assert not (tmp_path / "s.csv").exists()


def test_sample_submission_id_absent_from_test_csv(awkward, data, tmp_path, capfd):
    _, run, _ = awkward
    edit_csv(data / "test.csv", lambda f: f.drop(index=0))
    code, err = run_cli(["predict", "--run", run, "--data", data, "--out", tmp_path / "s.csv"], capfd)
    assert_refused(code, err, "sample_submission.csv: 1 id(s) not in test.csv (first: TEST_00000)")


def test_corrupt_test_image(awkward, data, tmp_path, capfd):
    _, run, _ = awkward
    (data / "test" / "TEST_00002.jpg").write_bytes(b"\xff\xd8\xff")
    code, err = run_cli(["predict", "--run", run, "--data", data, "--out", tmp_path / "s.csv"], capfd)
    assert_refused(code, err, "TEST_00002.jpg: not a readable image")


def test_test_csv_path_escaping_data_folder(awkward, data, tmp_path, capfd):
    _, run, _ = awkward
    edit_csv(data / "test.csv", set_cell(2, "img_path", "../../etc/passwd"))
    code, err = run_cli(["predict", "--run", run, "--data", data, "--out", tmp_path / "s.csv"], capfd)
    assert_refused(code, err, "test.csv row 4", "points outside the data folder; refused")


def test_load_test_table_follows_sample_submission(base_data, tmp_path):
    data = Path(shutil.copytree(base_data, tmp_path / "data"))
    sample = pd.read_csv(data / "sample_submission.csv", dtype=str)
    order = sample["id"].tolist()[::-1]
    sample.set_index("id").loc[order].reset_index().to_csv(data / "sample_submission.csv", index=False)
    assert load_test_table(data).ids == order


# --------------------------------------------------------------------------- issue 15: data loss, resume, messages


def test_force_with_a_model_typo_keeps_the_old_run(data, tmp_path, capfd):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("")
    (run / "config.yaml").write_text("the old run\n")
    code, err = run_cli(["train", "--data", data, "--out", run, "--force", *TINY, "--model", "timm:not_a_model"], capfd)
    assert_refused(code, err, "unknown timm model 'not_a_model'")
    assert (
        sorted(p.name for p in run.iterdir()) == [MARKER, "config.yaml"]
        and (run / "config.yaml").read_text() == "the old run\n"
    )


@pytest.mark.parametrize("target", ["data-folder", "folder-of-runs"])
def test_force_never_replaces_a_folder_this_tool_did_not_make(target, data, tmp_path, capfd):
    if target == "data-folder":
        out = data
    else:
        out = tmp_path / "runs"
        for name in ("a", "b"):
            (out / name).mkdir(parents=True)
            (out / name / MARKER).write_text("")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code, err = run_cli(["train", "--data", data, "--out", out, "--force", *TINY], capfd)
    assert_refused(code, err, str(out), "not a lowres-birds output folder")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


@pytest.fixture
def resumable(awkward, tmp_path) -> tuple[Path, Path]:
    """(a copy of the awkward run, a copy of its data) to change before a resume."""
    data, run, _ = awkward
    return Path(shutil.copytree(run, tmp_path / "run")), Path(shutil.copytree(data, tmp_path / "resume-data"))


def test_resume_refuses_a_renamed_class(resumable, capfd):
    run, data = resumable
    train = pd.read_csv(data / "train.csv", sep=";", dtype=str, encoding="utf-8-sig")
    train["label"] = train["label"].replace({"물총새": "Kingfisher"})
    train.to_csv(data / "train.csv", index=False)
    before = (run / "labels.json").read_bytes()
    code, err = run_cli(["train", "--resume", run, "--data", data], capfd)
    assert_refused(code, err, "labels.json lists other classes than the data")
    assert (run / "labels.json").read_bytes() == before


def test_resume_refuses_changed_data(resumable, capfd):
    run, data = resumable
    train = pd.read_csv(data / "train.csv", sep=";", dtype=str, encoding="utf-8-sig")
    train.iloc[:-1].to_csv(data / "train.csv", index=False)  # one image fewer
    code, err = run_cli(["train", "--resume", run, "--data", data], capfd)
    assert_refused(code, err, "changed since", "split.json records other ids, files or labels")


@pytest.mark.parametrize("flag", [["--recipe", "cpu"], ["--out", "elsewhere"], ["--force"], ["--lr", "0.1"]])
def test_resume_refuses_flags_that_cannot_apply(flag, resumable, capfd):
    run, _ = resumable
    code, err = run_cli(["train", "--resume", run, *flag], capfd)
    assert_refused(code, err, "--resume continues the run", f"drop {flag[0]}")


def test_resume_of_a_finished_run_changes_nothing(resumable, capfd):
    run, _ = resumable
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    code, err = run_cli(["train", "--resume", run], capfd)
    assert_refused(code, err, "finished training", "nothing to resume")
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    (run / "model.safetensors").unlink()
    code, err = run_cli(["train", "--resume", run], capfd)
    assert_refused(code, err, "model.safetensors is missing: train it again with --force")


def test_resume_print_config_prints_the_saved_config_even_without_a_checkpoint(resumable, capfd):
    run, _ = resumable
    (run / "checkpoint.pt").unlink(missing_ok=True)  # a finished run that kept no checkpoint: nothing to resume
    assert main(["train", "--resume", str(run), "--print-config"]) == 0
    assert capfd.readouterr().out == (run / "config.yaml").read_text(encoding="utf-8")


def test_a_damaged_run_among_several_is_named(awkward, tmp_path, capfd):
    data, run, _ = awkward
    damaged = Path(shutil.copytree(run, tmp_path / "second"))
    (damaged / "labels.json").write_text('"just a string"')
    code, err = run_cli(["predict", "--run", run, "--run", damaged, "--data", data, "--out", tmp_path / "s.csv"], capfd)
    assert_refused(code, err, str(damaged / "labels.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_predict_on_cuda_without_gpu(awkward, tmp_path, capfd):
    data, run, _ = awkward
    code, err = run_cli(
        ["predict", "--run", run, "--data", data, "--out", tmp_path / "s.csv", "--device", "cuda"], capfd
    )
    assert_refused(code, err, "--device cuda", "no CUDA GPU is visible")


def test_diverging_loss_without_a_checkpoint_says_so(data, tmp_path, capfd):
    args = [
        "train",
        "--data",
        data,
        "--out",
        tmp_path / "run",
        *FAST_MODEL,
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--lr",
        "1e30",
    ]
    code, err = run_cli(args, capfd)
    assert code == 2 and err.rstrip().endswith("(no checkpoint was written yet)"), err
    assert "loss became" in err and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_empty_upscale_cell_is_named_by_its_row(data, tmp_path, capfd):
    edit_csv(data / "train.csv", set_cell(3, "upscale_img_path", " "))
    code, err = run_cli(
        ["train", "--data", data, "--out", tmp_path / "run", *TINY, "--strategy", "hr-downscale:64"], capfd
    )
    assert_refused(code, err, "hr-downscale:64", "train.csv row 5: empty upscale_img_path (1 of 8 rows)")


@pytest.mark.parametrize(
    ("broken", "change", "fragments"),
    [
        ("labels", set_cell(1, "label", "   "), ["test_labels.csv row 3: empty label"]),
        ("labels", lambda f: f.iloc[:0], ["test_labels.csv has a header but no rows"]),
        ("submission", lambda f: f.iloc[:0], ["submission.csv has a header but no rows"]),
    ],
)
def test_evaluate_refuses_blank_labels_and_header_only_files(broken, change, fragments, data, tmp_path, capfd):
    submission = tmp_path / "submission.csv"
    pd.read_csv(data / "test_labels.csv", dtype=str).to_csv(submission, index=False)  # a perfect submission
    edit_csv(submission if broken == "submission" else data / "test_labels.csv", change)
    code, err = run_cli(
        ["evaluate", "--submission", submission, "--labels", data / "test_labels.csv", "--data", data], capfd
    )
    assert_refused(code, err, *fragments)
    assert not (tmp_path / "per_class.csv").exists()


def test_a_corrupt_image_cache_is_decoded_again(base_data, tmp_path, monkeypatch):
    from lowres_birds.data.images import cache_dir, load_images

    monkeypatch.setenv("LOWRES_BIRDS_CACHE", str(tmp_path / "cache"))
    paths = load_train_table(base_data).lr_paths
    first = np.array(load_images(paths, 64))
    (cached,) = cache_dir().glob("images-*.npy")
    cached.write_bytes(cached.read_bytes()[:100])
    with pytest.warns(UserWarning, match="was damaged; decoding the images again"):
        again = np.array(load_images(paths, 64))
    np.testing.assert_array_equal(again, first)


def test_written_files_get_the_mode_open_would_give(tmp_path):
    from lowres_birds.run_dir import write_text

    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _inputs_world(trained_run, demo_data, tmp_path) -> dict[str, Path]:
    """Copies of a run and of the demo data inside a folder this tool made, as outputs may land among them."""
    holder = tmp_path / "holder"
    run = Path(shutil.copytree(trained_run, holder / "run"))
    data = Path(shutil.copytree(demo_data, holder / "data"))
    (holder / MARKER).write_text("made by lowres-birds", encoding="utf-8")
    return {"holder": holder, "run": run, "data": data, "elsewhere": demo_data}


START = [*TINY_TRAIN, "--no-student-from-teacher"]
OUTPUTS_OVER_INPUTS = {
    # command builder (world -> argv), the input file that must survive (world -> path), words of the refusal
    "predict over a run file": (
        lambda w: ["predict", "--run", w["run"], "--data", w["data"], "--out", w["run"] / "labels.json"],
        lambda w: w["run"] / "labels.json",
        "files of --run",
    ),
    "predict over the weights": (
        lambda w: ["predict", "--run", w["run"], "--data", w["data"], "--out", w["run"] / "model.safetensors"],
        lambda w: w["run"] / "model.safetensors",
        "files of --run",
    ),
    "predict over a data table": (
        lambda w: ["predict", "--run", w["run"], "--data", w["data"], "--out", w["data"] / "test.csv"],
        lambda w: w["data"] / "test.csv",
        "files of --data",
    ),
    "predict over an input photo": (
        lambda w: ["predict", "--run", w["run"], "--images", w["data"] / "test", "--out", w["data"] / "test" / "x.jpg"],
        lambda w: w["data"] / "test",
        "files of --images",
    ),
    "predict over a photo of a glob": (
        lambda w: [
            "predict",
            "--run",
            w["run"],
            "--images",
            f"{w['data']}/test/*.jpg",
            "--out",
            w["data"] / "test" / "a.png",
        ],
        lambda w: w["data"] / "test",
        "files of --images",
    ),
    "eda into the data": (
        lambda w: ["eda", "--data", w["data"], "--out", w["data"] / "train" / "eda"],
        lambda w: w["data"] / "train.csv",
        "lies inside --data",
    ),
    "report into the data": (
        lambda w: ["report", "--run", w["run"], "--data", w["data"], "--out", w["data"] / "figures"],
        lambda w: w["data"] / "train.csv",
        "lies inside --data",
    ),
    "train into a folder holding its data": (
        lambda w: ["train", "--data", w["data"], "--out", w["holder"], *TINY_TRAIN],
        lambda w: w["data"] / "train.csv",
        "holds --data",
    ),
    "train over the run it starts from": (
        lambda w: ["train", "--data", w["data"], "--init-from", w["run"], "--out", w["run"], *START],
        lambda w: w["run"] / "model.safetensors",
        "also given as --init-from",
    ),
    "train into a folder holding the run it starts from": (
        lambda w: ["train", "--data", w["elsewhere"], "--init-from", w["run"], "--out", w["holder"], *START],
        lambda w: w["run"] / "model.safetensors",
        "holds --init-from",
    ),
    "train into the ensemble it distils": (
        lambda w: [
            "train",
            "--data",
            w["data"],
            "--distill-from",
            w["run"],
            "--out",
            w["run"],
            *TINY_TRAIN,
            "--kd-weight",
            "0.5",
        ],
        lambda w: w["run"] / "model.safetensors",
        "also given as --distill-from",
    ),
}


@pytest.mark.parametrize("case", OUTPUTS_OVER_INPUTS)
def test_an_output_never_replaces_an_input_even_with_force(trained_run, demo_data, tmp_path, capfd, case):
    argv, survivor, words = OUTPUTS_OVER_INPUTS[case]
    world = _inputs_world(trained_run, demo_data, tmp_path)
    before = sorted(p.relative_to(world["holder"]) for p in world["holder"].rglob("*"))
    code, err = run_cli([*argv(world), "--force"], capfd)
    assert_refused(code, err, words)
    assert survivor(world).exists()
    assert sorted(p.relative_to(world["holder"]) for p in world["holder"].rglob("*")) == before


def test_an_output_beside_the_inputs_that_this_tool_does_not_read_is_written(trained_run, demo_data, tmp_path, capfd):
    world = _inputs_world(trained_run, demo_data, tmp_path)
    for out in (world["data"] / "submission.csv", world["run"] / "submission.csv"):
        code, err = run_cli(["predict", "--run", world["run"], "--data", world["data"], "--out", out], capfd)
        assert code == 0, err
        assert list(pd.read_csv(out).columns) == ["id", "label"]


@pytest.mark.parametrize("images", ["", "   "])
def test_an_empty_images_path_is_refused_instead_of_searching_the_working_folder(trained_run, tmp_path, capfd, images):
    code, err = run_cli(["predict", "--run", trained_run, "--images", images, "--out", tmp_path / "p.csv"], capfd)
    assert_refused(code, err, "no images given")


def test_weights_that_overflow_are_refused_not_scored(demo_data, tmp_path, capfd):
    """A learning rate so large that the last update overflows the weights (its loss was still finite): the
    validation answers nan, which used to be scored 0.17 and reported as a trained run."""
    argv = ["train", "--data", demo_data, "--out", tmp_path / "run", *FAST_MODEL, "--epochs", "1", "--lr", "1e308"]
    code, err = run_cli([*argv, "--teacher", "frozen", "--kd-weight", "0", "--hr-view-ratio", "0"], capfd)
    assert_refused(code, err, "training diverged", "lower --lr")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def _damaged_run(trained_run, demo_data, tmp_path) -> list:
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    (run / "split.json").unlink()
    return ["export", "--run", run, "--format", "hf"]


def _data_with_a_truncated_image(trained_run, demo_data, tmp_path) -> list:
    data = Path(shutil.copytree(demo_data, tmp_path / "data"))
    image = data / "train" / "TRAIN_00003.jpg"
    image.write_bytes(image.read_bytes()[:200])
    return ["eda", "--data", data]


def _too_many_folds(trained_run, demo_data, tmp_path) -> list:
    return ["train", "--data", demo_data, "--folds", "100", *FAST_MODEL]


@pytest.mark.parametrize("refused", [_damaged_run, _data_with_a_truncated_image, _too_many_folds])
def test_a_refused_command_leaves_no_output_folder(trained_run, demo_data, tmp_path, capfd, refused):
    """A rerun after the fix must not meet 'already exists; pass --force' for a folder the refusal half wrote."""
    out = tmp_path / "out"
    code, err = run_cli([*refused(trained_run, demo_data, tmp_path), "--out", out], capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


WRONG_KINDS = {
    # argv from (a trained run, the demo data, a file, a folder), the words of the one-line refusal
    "an ONNX file without its suffix": (
        lambda run, data, file, folder: ["predict-image", file, "--onnx", file],
        "must end in .onnx",
    ),
    "a file as the run": (
        lambda run, data, file, folder: ["predict", "--run", file, "--data", data, "--out", folder / "s.csv"],
        "is not a finished run folder (a file)",
    ),
    "a folder as the submission": (
        lambda run, data, file, folder: ["evaluate", "--submission", folder, "--labels", file],
        "is a folder, not a CSV file",
    ),
    "a file as the data": (
        lambda run, data, file, folder: ["calibrate", "--run", run, "--data", file],
        "is a file, not a folder",
    ),
}


@pytest.mark.parametrize("case", WRONG_KINDS)
def test_a_path_of_the_wrong_kind_is_named_as_such(trained_run, demo_data, tmp_path, capfd, case):
    argv, words = WRONG_KINDS[case]
    file, folder = tmp_path / "model.bin", tmp_path / "folder"
    file.write_bytes(b"\x08\x01")
    folder.mkdir()
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    code, err = run_cli(argv(run, demo_data, file, folder), capfd)
    assert_refused(code, err, words)


def test_an_image_cache_that_is_a_file_is_named(trained_run, demo_data, tmp_path, capfd, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("LOWRES_BIRDS_CACHE", str(tmp_path / "cache"))
    code, err = run_cli(["predict", "--run", trained_run, "--data", demo_data, "--out", tmp_path / "s.csv"], capfd)
    assert_refused(code, err, "LOWRES_BIRDS_CACHE=", "is a file, not a folder")


@pytest.mark.parametrize("summary", ["ensemble.json", "oof.json"])
@pytest.mark.parametrize("command", ["export-hf", "demo", "train"])
def test_force_never_replaces_a_folder_of_runs_with_one_output(
    trained_run, demo_data, tmp_path, capfd, summary, command
):
    group = tmp_path / "group"
    (group / "member").mkdir(parents=True)
    (group / MARKER).write_text("made by lowres-birds", encoding="utf-8")
    (group / summary).write_text("{}", encoding="utf-8")
    argv = {
        "export-hf": ["export", "--format", "hf", "--run", trained_run],
        "demo": ["demo"],
        "train": ["train", "--data", demo_data, *FAST_MODEL],
    }[command]
    code, err = run_cli([*argv, "--out", group, "--force"], capfd)
    assert_refused(code, err, "is an ensemble or folds folder", "choose another --out")
    assert (group / summary).is_file() and (group / "member").is_dir()


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`lowres-birds predict-image photos/ --run R | head -1`: the closed pipe was 'unexpected error', exit 1."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lowres_birds import cli\n"
        "def gone(args):\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "cli.COMMANDS['eda'] = (cli.add_eda, gone)\n"
        "sys.exit(cli.main(['eda', '--data', 'anything']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 141 and done.stderr == "", done.stderr
