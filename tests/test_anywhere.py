"""Using a trained model anywhere: the pipeline-style Classifier, `predict --images`, `evaluate` on an
ImageFolder, `predict-image` on folders, and numbered run folders."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FAST_TRAIN
from PIL import Image

from lowres_birds.cli import main
from lowres_birds.errors import UserError
from lowres_birds.predict.classifier import Classifier


@pytest.fixture(scope="module")
def classifier(trained_run) -> Classifier:
    return Classifier.load(trained_run)


@pytest.fixture(scope="module")
def image_folder(demo_data, tmp_path_factory) -> Path:
    """The demo test images as an ImageFolder (DIR/<species>/<id>.jpg), labels from test_labels.csv."""
    folder = tmp_path_factory.mktemp("imagefolder") / "test"
    for row in pd.read_csv(demo_data / "test_labels.csv").itertuples():
        (folder / row.label).mkdir(parents=True, exist_ok=True)
        (folder / row.label / f"{row.id}.jpg").symlink_to(demo_data / "test" / f"{row.id}.jpg")
    return folder


# --------------------------------------------------------------------------- the Python API


def test_classifier_is_called_like_a_hugging_face_pipeline(classifier, demo_data):
    photo = sorted((demo_data / "test").glob("*.jpg"))[0]
    answer = classifier(photo, top_k=2)
    assert [set(entry) for entry in answer] == [{"label", "score"}] * 2
    assert answer[0]["score"] >= answer[1]["score"] and answer[0]["label"] in classifier.labels

    pixels = np.asarray(Image.open(photo).convert("RGB"))
    same = [
        classifier(str(photo), top_k=2),
        classifier(Image.open(photo), top_k=2),
        classifier(pixels, top_k=2),
        classifier(pixels.transpose(2, 0, 1), top_k=2),
        classifier.predict(photo, top_k=2),
    ]
    assert all(other == answer for other in same)
    batch = classifier([photo, str(photo), pixels], top_k=1)
    assert [best["label"] for (best,) in batch] == [answer[0]["label"]] * 3
    # batched: float noise
    assert [best["score"] for (best,) in batch] == pytest.approx([answer[0]["score"]] * 3, abs=1e-5)
    assert len(classifier(photo, top_k=50)) == len(classifier.labels)  # like HF: never more than the classes


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((64, 64, 3), 0.5, dtype=np.float32), "uint8 pixels"),
        (np.zeros((2, 64, 64, 3), dtype=np.uint8), "pass a list"),
        (np.full((64, 64, 3), 300, dtype=np.int64), "values 300 to 300"),
    ],
)
def test_classifier_refuses_input_it_would_misread(classifier, image, message):
    with pytest.raises(UserError, match=message):
        classifier(image)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.full((2, 64, 64, 3), 0.5, dtype=np.float32), "uint8 pixels"),
        (np.full((2, 3, 64, 64), 1000, dtype=np.int64), "values 1000 to 1000"),
        (np.zeros((64, 64, 3), dtype=np.uint8), "for one image pass images"),
        (np.zeros((2, 64, 64, 5), dtype=np.uint8), "N x H x W x 3"),
    ],
)
def test_predict_arrays_refuses_batches_it_would_misread(classifier, images, message):
    with pytest.raises(UserError, match=message):
        classifier.predict_arrays(images)


@pytest.mark.parametrize("weights", [[0.5], [1, -1], [0, 0], [1, float("nan")]])
def test_combine_refuses_weights_that_are_not_shares(classifier, weights):
    with pytest.raises(UserError, match="non-negative numbers, one per classifier"):
        Classifier.combine([classifier, classifier], weights)


def test_combine_normalises_relative_weights(classifier):
    pixels = np.zeros((1, 64, 64, 3), np.uint8)
    combined = Classifier.combine([classifier, classifier], [2, 6]).predict_arrays(pixels)
    np.testing.assert_allclose(combined, classifier.predict_arrays(pixels), atol=1e-5)


def test_the_model_refuses_float_pixels(trained_run):
    import torch

    from lowres_birds.model.factory import load_run_model

    model, _ = load_run_model(trained_run)
    with pytest.raises(UserError, match="uint8"):
        model(torch.rand(1, 3, 64, 64))


# --------------------------------------------------------------------------- predict any images


def test_predict_images_writes_one_row_per_image_of_a_folder(trained_run, classifier, tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    for index in range(200):  # nested folders, odd sizes and formats; a text file that is skipped
        path = folder / f"part{index % 3}" / f"{index:03d}.{'png' if index % 4 == 0 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48 + index % 40, 64, 3), dtype=np.uint8)).save(path)
    (folder / "notes.txt").write_text("not a photo")
    out = tmp_path / "predictions.csv"

    assert main(["predict", "--run", str(trained_run), "--images", str(folder), "--out", str(out), "--top", "2"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 200 and list(table.columns) == [
        "path",
        "label",
        "score",
        "label_2",
        "score_2",
        "unknown",
        "unknown_score",
    ]
    assert table["path"].is_unique and (table["score"] >= table["score_2"]).all()
    first = [answer["label"] for answer in classifier(table["path"][0], top_k=2)]
    assert table["label"][0] == ("" if table["unknown"][0] else first[0]) and table["label_2"][0] == first[1]
    assert f"wrote 200 predictions to {out}" in capsys.readouterr().out

    assert (
        main(
            [
                "predict",
                "--run",
                str(trained_run),
                "--images",
                str(folder / "part1" / "*.jpg"),
                "--out",
                str(tmp_path / "glob.csv"),
            ]
        )
        == 0
    )
    assert len(pd.read_csv(tmp_path / "glob.csv")) == len(list((folder / "part1").glob("*.jpg")))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "one of the arguments --data --images is required"),
        (["--images", "EMPTY"], "no images"),
        (["--images", "NOWHERE"], "not found"),
        (["--images", "EMPTY", "--data", "EMPTY"], "not allowed with"),
    ],
)
def test_predict_images_bad_input_is_one_line(trained_run, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    argv = [{"EMPTY": str(tmp_path / "empty"), "NOWHERE": str(tmp_path / "nowhere")}.get(a, a) for a in extra]
    assert main(["predict", "--run", str(trained_run), "--out", str(tmp_path / "p.csv"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_predict_image_accepts_folders(trained_run, image_folder, capsys):
    import json

    assert main(["predict-image", str(image_folder), "--run", str(trained_run), "--top", "1", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == len(list(image_folder.rglob("*.jpg"))) and all(len(a["top"]) == 1 for a in answers)


# --------------------------------------------------------------------------- evaluate on an ImageFolder


def _scores(printed: str) -> str:
    return re.search(r"macro-F1 \S+  accuracy \S+", printed).group(0)


def test_evaluate_on_an_image_folder_equals_evaluate_through_csvs(trained_run, image_folder, tmp_path, capsys):
    assert (
        main(
            ["evaluate", "--run", str(trained_run), "--data", str(image_folder), "--out-dir", str(tmp_path / "direct")]
        )
        == 0
    )
    direct = _scores(capsys.readouterr().out)
    assert (tmp_path / "direct" / "confusion_matrix.png").is_file()

    predictions = tmp_path / "predictions.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(trained_run),
                "--images",
                str(image_folder),
                "--out",
                str(predictions),
                "--top",
                "1",
            ]
        )
        == 0
    )
    submission = pd.read_csv(predictions).rename(columns={"path": "id"})[["id", "label"]]
    submission.to_csv(tmp_path / "submission.csv", index=False)
    truth = pd.DataFrame({"id": submission["id"], "label": [Path(p).parent.name for p in submission["id"]]})
    truth.to_csv(tmp_path / "labels.csv", index=False)
    capsys.readouterr()
    assert (
        main(["evaluate", "--submission", str(tmp_path / "submission.csv"), "--labels", str(tmp_path / "labels.csv")])
        == 0
    )
    assert _scores(capsys.readouterr().out) == direct


def test_evaluate_run_without_out_dir_numbers_its_folder_and_refuses_mixed_modes(
    trained_run, image_folder, demo_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "evaluate").mkdir(parents=True)
    assert main(["evaluate", "--run", str(trained_run), "--data", str(image_folder)]) == 0
    assert (tmp_path / "runs" / "evaluate2" / "per_class.csv").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained_run), "--data", str(demo_data)]) == 2
    assert "not a labelled ImageFolder" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(trained_run),
                "--submission",
                "s.csv",
                "--labels",
                "l.csv",
                "--data",
                str(image_folder),
            ]
        )
        == 2
    )
    assert "not both" in capsys.readouterr().err
    assert main(["evaluate", "--submission", "s.csv"]) == 2


def test_evaluate_scores_a_run_on_the_labelled_half_of_a_test_set_as_predict_then_evaluate(
    trained_run, demo_data, tmp_path, capsys
):
    labels = tmp_path / "public.csv"
    half = pd.read_csv(demo_data / "test_labels.csv", dtype=str).iloc[::2]
    half.to_csv(labels, index=False)
    argv = ["evaluate", "--run", str(trained_run), "--labels", str(labels), "--data", str(demo_data)]
    assert main([*argv, "--out-dir", str(tmp_path / "direct")]) == 0
    printed = capsys.readouterr().out
    assert f"scored {len(half)} labelled images" in printed and (tmp_path / "direct" / "per_class.csv").is_file()
    submission = tmp_path / "submission.csv"
    assert main(["predict", "--run", str(trained_run), "--data", str(demo_data), "--out", str(submission)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--submission", str(submission), "--labels", str(labels), "--data", str(demo_data)]) == 0
    assert _scores(capsys.readouterr().out) == _scores(printed)


def _labels_with(change):
    def write(demo_data: Path, path: Path) -> None:
        frame = pd.read_csv(demo_data / "test_labels.csv", dtype=str).iloc[:6]
        change(frame).to_csv(path, index=False)

    return write


@pytest.mark.parametrize(
    ("labels", "beside", "fragment"),
    [
        (_labels_with(lambda f: pd.concat([f, f.iloc[:1].assign(id="NOPE")])), True, "1 id(s) not in"),
        (_labels_with(lambda f: pd.concat([f, f.iloc[:1]])), True, "duplicate id"),
        (_labels_with(lambda f: f.assign(label=[" "] + list(f["label"][1:]))), True, "row 2: empty label"),
        (_labels_with(lambda f: f.iloc[:0]), True, "has a header but no rows"),
        (lambda demo_data, path: path.write_bytes(b"\x00\xff\x00"), True, "public.csv"),
        (_labels_with(lambda f: f), False, "no test.csv beside --labels"),
    ],
)
def test_evaluate_run_on_test_labels_refuses_bad_labels_in_one_line(
    labels, beside, fragment, trained_run, demo_data, tmp_path, capsys
):
    test_dir = tmp_path / "data"
    test_dir.mkdir()
    if beside:  # the labels in a test folder of the competition layout, found without --data
        (test_dir / "test.csv").write_bytes((demo_data / "test.csv").read_bytes())
        (test_dir / "test").symlink_to(demo_data / "test")
    labels(demo_data, test_dir / "public.csv")
    capsys.readouterr()
    argv = ["evaluate", "--run", str(trained_run), "--labels", str(test_dir / "public.csv")]
    assert main([*argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "per_class.csv").exists()


# --------------------------------------------------------------------------- numbered run folders


def test_numbered_folders(tmp_path):
    from lowres_birds.run_dir import numbered_folder

    assert numbered_folder("train", tmp_path) == tmp_path / "train"
    (tmp_path / "train").mkdir()
    (tmp_path / "train2").mkdir()
    assert numbered_folder("train", tmp_path) == tmp_path / "train3"


def test_train_without_out_takes_the_next_numbered_folder(demo_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "train").mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", str(demo_data), *FAST_TRAIN]) == 2
    assert "pass --out under torchrun" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["train", "--data", str(demo_data), *FAST_TRAIN]) == 0
    assert "run folder: runs/train2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "train2" / "model.safetensors").is_file() and not any(
        (tmp_path / "runs" / "train").iterdir()
    )
