"""eda: class table, image statistics, and the quality checks finding planted duplicates, leakage and a
mismatched LR/HR twin."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lowres_birds.cli import main


@pytest.fixture(scope="module")
def planted(demo_data, tmp_path_factory) -> Path:
    """The demo set with problems planted: a duplicate inside train, a train image copied into test, a
    re-encoded (near-duplicate) train image in test, and an HR twin swapped for another image's."""
    data = tmp_path_factory.mktemp("planted") / "data"
    shutil.copytree(demo_data, data)
    shutil.copyfile(data / "train" / "TRAIN_00001.jpg", data / "train" / "TRAIN_00002.jpg")
    shutil.copyfile(data / "train" / "TRAIN_00003.jpg", data / "test" / "TEST_00000.jpg")
    Image.open(data / "train" / "TRAIN_00004.jpg").save(data / "test" / "TEST_00001.jpg", quality=60)
    shutil.copyfile(data / "upscale_train" / "TRAIN_00006.jpg", data / "upscale_train" / "TRAIN_00005.jpg")
    return data


@pytest.fixture(scope="module")
def eda_out(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eda")
    assert main(["eda", "--data", str(planted), "--out", str(out)]) == 0
    return out


def test_class_table_counts_every_training_label_most_frequent_first(eda_out, planted):
    counts = pd.read_csv(eda_out / "class_counts.csv")
    labels = pd.read_csv(planted / "train.csv")["label"]
    assert list(counts.columns) == ["label", "count"]
    assert dict(zip(counts["label"], counts["count"])) == labels.value_counts().to_dict()
    assert counts["count"].is_monotonic_decreasing


def test_image_statistics_cover_the_three_folders(eda_out, capsys):
    stats = pd.read_csv(eda_out / "image_stats.csv").set_index("folder")
    assert list(stats.index) == ["train", "upscale_train", "test"]
    assert stats.loc["train", "sizes"] == "64x64 (30)"
    assert stats.loc["upscale_train", "sizes"] == "256x256 (30)"
    assert stats.loc["test", "formats"] == "JPEG (18)"
    means = [float(v) for v in stats.loc["train", "mean (R, G, B)"].split(",")]
    assert all(0.2 < m < 0.8 for m in means)


def test_duplicate_inside_train_is_found(eda_out):
    duplicates = pd.read_csv(eda_out / "duplicates_train.csv")
    assert sorted(duplicates["id"]) == ["TRAIN_00001", "TRAIN_00002"]
    assert duplicates["group"].nunique() == 1


def test_train_test_leakage_finds_the_copy_and_the_re_encoded_image(eda_out):
    leaks = pd.read_csv(eda_out / "leakage_train_test.csv").set_index("test id")
    assert leaks.loc["TEST_00000", "kind"] == "exact"
    assert leaks.loc["TEST_00000", "train id"] == "TRAIN_00003"
    assert leaks.loc["TEST_00001", "kind"] == "near"
    assert leaks.loc["TEST_00001", "train id"] == "TRAIN_00004"
    assert len(leaks) == 2  # the synthetic birds are all different pictures


def test_mismatched_twins_are_flagged(eda_out):
    """TRAIN_00005 got another HR twin; TRAIN_00002's LR image was overwritten by a duplicate, so its twin
    no longer matches either. Every untouched pair stays well above the threshold."""
    twins = pd.read_csv(eda_out / "twin_psnr.csv")
    assert sorted(twins["id"].iloc[:2]) == ["TRAIN_00002", "TRAIN_00005"]
    assert twins["psnr_db"].iloc[1] < 20 < twins["psnr_db"].iloc[2]


def test_page_embeds_its_figures_and_needs_no_other_file(eda_out):
    page = (eda_out / "eda.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 4  # class counts, samples, leakage pairs, twin pairs
    assert 'src="http' not in page and "<script" not in page
    for name in ("class_counts.png", "samples.png", "leakage_examples.png", "twin_lowest_psnr.png"):
        assert (eda_out / name).stat().st_size > 1000


def test_image_folder_layout_without_test_or_twins_still_works(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (64, 64), (40 * index, 100, 200 if label == "a" else 0)).save(
                tmp_path / "data" / label / f"{index}.png"
            )
    assert main(["eda", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    assert list(pd.read_csv(tmp_path / "out" / "image_stats.csv")["folder"]) == ["train"]


def test_missing_data_folder_is_one_line_error(tmp_path, capsys):
    assert main(["eda", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: data folder")


def test_labels_training_refuses_are_reported_not_refused(demo_data, tmp_path, capsys):
    """An image without a label and a class of one image stop train; eda is where a user finds them."""
    data = Path(shutil.copytree(demo_data, tmp_path / "data"))
    table = pd.read_csv(data / "train.csv", dtype=str)
    table.loc[0, "label"] = ""
    table.loc[1, "label"] = "Lonely bird"
    table.to_csv(data / "train.csv", index=False)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    assert "empty label" in capsys.readouterr().err
    assert main(["eda", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    expected = f"labels: 1 image(s) without a label (first: {table.loc[0, 'id']}), 1 class(es) of a single image"
    assert f"{expected} (Lonely bird); train refuses both" in printed
    assert "1 class(es) of a single image (Lonely bird)" in (tmp_path / "out" / "eda.html").read_text(encoding="utf-8")
