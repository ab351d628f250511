"""Calibration and the unknown score: fitted at the end of train (and by ``calibrate``), and the same calibrated
scores and unknown flag from Classifier (run folder, ONNX file, HF folder), the HF pipeline, predict and the API;
runs calibrated before this existed still load; damaged calibration files are one line and exit 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lowres_birds.cli import main
from lowres_birds.model.calibration import (
    SCORES,
    CalibratedHead,
    expected_calibration_error,
    feature_statistics,
    fit_temperature,
    risk_coverage,
)
from lowres_birds.predict.classifier import Classifier, average_predictions, to_model_input
from lowres_birds.run_dir import RunDir


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def onnx_file(trained_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--run", str(trained_run), "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def test_images(demo_data):
    paths = sorted((demo_data / "test").glob("*.jpg"))
    return paths, np.stack([to_model_input(path) for path in paths])


def test_temperature_is_recovered_from_overconfident_logits():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 2
    targets = torch.distributions.Categorical(logits=true_logits).sample()
    assert fit_temperature(true_logits * 3, targets) == pytest.approx(3, rel=0.1)
    # the flip-TTA fit: the labels drawn from the mean of two views' probabilities, each view's logits x 3
    other = torch.randn(4000, 10, generator=generator) * 2
    mixed = torch.multinomial((true_logits.softmax(-1) + other.softmax(-1)) / 2, 1, generator=generator)[:, 0]
    assert fit_temperature(true_logits * 3, mixed, other * 3) == pytest.approx(3, rel=0.1)
    assert fit_temperature(true_logits * 3, mixed) != pytest.approx(3, rel=0.1)  # one view alone misfits it
    calibrated = true_logits.softmax(-1).numpy()
    overconfident = (true_logits * 3).softmax(-1).numpy()
    assert (
        expected_calibration_error(calibrated, targets.numpy())
        < 0.03
        < expected_calibration_error(overconfident, targets.numpy())
    )


def test_an_error_free_validation_split_leaves_the_temperature_unfitted():
    from lowres_birds.predict.calibrate import describe

    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(40) % 4
    logits = torch.randn(40, 4, generator=generator) + 6 * torch.nn.functional.one_hot(targets, 4)
    assert fit_temperature(logits, targets) == 1.0  # the NLL would fall all the way to T -> 0
    assert fit_temperature(logits, targets, logits.clone()) == 1.0
    wrong = logits.clone()
    wrong[0] = wrong[0].roll(1)  # one image answered wrongly: a finite temperature of least NLL
    for fitted in (fit_temperature(wrong, targets), fit_temperature(logits, targets, wrong)):  # wrong: mirrored only
        assert 0.05 < fitted < 5 and fitted != 1.0
    line = describe(
        Path("run"),
        {
            "temperature": 1.0,
            "tta": "none",
            "score": "energy",
            "threshold": 0.0,
            "keep_known": 0.95,
            "unfitted": True,
            "validation": dict.fromkeys(("images", "ece_before", "ece_after", "nll_before", "nll_after"), 0),
        },
    )
    assert "not fitted: no validation image is answered wrongly" in line


def test_risk_coverage_answers_the_most_confident_first():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    coverage, accuracy, threshold = risk_coverage(probs, np.array([0, 1, 1]))
    assert coverage.tolist() == pytest.approx([1 / 3, 2 / 3, 1])
    assert accuracy.tolist() == pytest.approx([1, 1, 2 / 3]) and threshold.tolist() == pytest.approx([0.9, 0.8, 0.6])


@pytest.mark.parametrize("score", SCORES)
def test_every_score_ranks_a_far_feature_above_a_training_one(score):
    generator = torch.Generator().manual_seed(0)
    means = torch.eye(3, 16) * 5
    targets = torch.arange(60) % 3
    features = means[targets] + 0.1 * torch.randn(60, 16, generator=generator)
    head = CalibratedHead(1.0, score, feature_statistics(score, features, targets, 3))
    near, far = means[:1] + 0.05, -means[:1] + torch.ones(1, 16)
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.4, 0.3, 0.3]])  # what a confident / a lost classifier says
    _, unknown = head(torch.cat([near, far]), logits)
    assert unknown[1] > unknown[0]


def test_train_calibrates_and_every_path_gives_the_same_scores_and_flag(trained_run, onnx_file, test_images):
    calibration = json.loads((trained_run / "calibration.json").read_text())
    assert calibration["temperature"] > 0 and calibration["score"] == "mahalanobis"
    assert (trained_run / "unknown.safetensors").is_file()
    _, images = test_images
    run, onnx, hf = (Classifier.load(source) for source in (trained_run, onnx_file, trained_run / "hf"))
    probs, unknown = run.predict_scores(images)
    for other in (onnx, hf):
        other_probs, other_unknown = other.predict_scores(images)
        np.testing.assert_allclose(other_probs, probs, atol=2e-4)
        np.testing.assert_allclose(other_unknown, unknown, rtol=1e-3, atol=1e-3)
        assert other.unknown_threshold == pytest.approx(run.unknown_threshold)
        assert (other.is_unknown(other_unknown) == run.is_unknown(unknown)).all()


def test_the_pipeline_gives_the_calibrated_scores(trained_run, test_images):
    from transformers import pipeline

    paths, images = test_images
    classify = pipeline("image-classification", model=str(trained_run / "hf"))
    expected = Classifier.load(trained_run).predict_arrays(images)
    labels = json.loads((trained_run / "labels.json").read_text())
    for path, row in zip(paths[:4], expected):
        answer = classify(str(path), top_k=1)[0]
        assert answer["label"] == labels[int(row.argmax())]
        assert answer["score"] == pytest.approx(float(row.max()), abs=2e-3)
    config = json.loads((trained_run / "hf" / "config.json").read_text())
    threshold = Classifier.load(trained_run).unknown_threshold
    assert config["lowres_birds"]["unknown"]["threshold"] == pytest.approx(threshold)


def test_predict_writes_the_unknown_columns_and_abstains(trained_run, demo_data, tmp_path):
    out, probs_out = tmp_path / "p.csv", tmp_path / "probs.csv"
    args = ["predict", "--run", str(trained_run), "--images", str(demo_data / "test"), "--out", str(out)]
    assert main([*args, "--probs", str(probs_out)]) == 0
    table, probs = pd.read_csv(out), pd.read_csv(probs_out)
    assert {"unknown", "unknown_score"} <= set(table.columns) and set(table["unknown"]) <= {0, 1}
    np.testing.assert_allclose(probs["unknown_score"], table["unknown_score"], atol=1e-5)
    classifier = Classifier.load(trained_run)
    _, unknown = classifier.predict_scores(np.stack([to_model_input(p) for p in table["path"]]))
    assert table["unknown"].tolist() == classifier.is_unknown(unknown).astype(int).tolist()
    labels = pd.read_csv(out, keep_default_na=False)["label"]
    assert (labels.eq("") == table["unknown"].eq(1)).all()  # a flagged photo is named no species, as in the API
    assert main([*args, "--force", "--min-confidence", "1"]) == 0
    assert pd.read_csv(out, keep_default_na=False)["label"].eq("").all()  # nothing reaches probability 1
    submission = tmp_path / "s.csv"
    assert main(["predict", "--run", str(trained_run), "--data", str(demo_data), "--out", str(submission)]) == 0
    assert pd.read_csv(submission)["label"].notna().all()  # a submission names a species for every row


def test_predict_image_and_the_api_carry_the_flag(trained_run, test_images, capsys):
    from fastapi.testclient import TestClient

    from lowres_birds.predict.serving import create_app

    paths, images = test_images
    classifier = Classifier.load(trained_run)
    _, unknown = classifier.predict_scores(images[:1])
    capsys.readouterr()
    assert main(["predict-image", str(paths[0]), "--run", str(trained_run), "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["unknown"] == bool(classifier.is_unknown(unknown)[0])
    assert answer["unknown_score"] == pytest.approx(float(unknown[0]), rel=1e-4, abs=1e-4)
    with TestClient(create_app(classifier)) as client:
        reply = client.post("/api/predict", files={"file": ("a.jpg", paths[0].read_bytes(), "image/jpeg")}).json()
        assert reply["unknown"] == answer["unknown"]
        assert reply["unknown_score"] == pytest.approx(answer["unknown_score"])
        reply = client.post(
            "/api/predict?min_confidence=1", files={"file": ("a.jpg", paths[0].read_bytes(), "image/jpeg")}
        ).json()
        assert reply["label"] is None


def test_a_run_from_before_calibration_loads_uncalibrated_and_says_so_once(trained_run, test_images, tmp_path, capfd):
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    (old / "calibration.json").unlink()
    (old / "unknown.safetensors").unlink()
    _, images = test_images
    first = Classifier.load(old)
    second = Classifier.load(old)
    probs, unknown = first.predict_scores(images)
    assert unknown is None and first.is_unknown(None) is None and second.unknown_threshold is None
    assert capfd.readouterr().err.count("no calibration.json") == 1
    calibrated, _ = Classifier.load(trained_run).predict_scores(images)
    temperature = json.loads((trained_run / "calibration.json").read_text())["temperature"]
    rescaled = (torch.from_numpy(np.log(probs)) / temperature).softmax(-1).numpy()
    np.testing.assert_allclose(rescaled, calibrated, atol=1e-4)  # softmax(logits / T); the labels are the same


def _edit_json(path: Path, **values) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | values))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "calibration.json").write_text("{not json"), "calibration.json is not valid JSON"),
        (lambda run: (run / "calibration.json").write_text('{"temperature": -1}'), "must give 'temperature'"),
        (lambda run: _edit_json(run / "calibration.json", unfitted="yes"), "'unfitted' (true or false)"),
        (lambda run: (run / "unknown.safetensors").write_bytes(b"garbage"), "not a readable safetensors file"),
        (lambda run: (run / "unknown.safetensors").unlink(), "unknown.safetensors not found"),
    ],
)
def test_a_damaged_calibration_is_one_line_and_exit_2(trained_run, demo_data, tmp_path, capsys, damage, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("hf", "report"))
    damage(run)
    capsys.readouterr()
    assert main(["predict-image", str(next((demo_data / "test").glob("*.jpg"))), "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and "lowres-birds calibrate --run" in err and len(err.strip().splitlines()) == 1


def test_calibrate_refits_an_old_run(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("hf", "report"))
    (run / "calibration.json").unlink()
    (run / "unknown.safetensors").unlink()
    assert main(["calibrate", "--run", str(run), "--score", "energy"]) == 0
    assert "temperature" in capsys.readouterr().out
    saved = RunDir(run).calibration(SCORES, {})
    assert saved is not None and saved[0]["score"] == "energy" and not (run / "unknown.safetensors").exists()
    assert main(["calibrate", "--run", str(run), "--score", "cosine"]) == 2


def test_calibrate_rewrites_the_runs_hugging_face_folder(trained_run, test_images, tmp_path, capsys):
    """RUN/hf folds the temperature and carries the unknown score: a later calibrate must not leave it stale."""
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    assert main(["calibrate", "--run", str(run), "--score", "energy", "--tta", "flip"]) == 0
    assert f"Hugging Face folder: {run / 'hf'}" in capsys.readouterr().out
    assert json.loads((run / "hf" / "calibration.json").read_text())["score"] == "energy"
    from_run, from_hf = Classifier.load(run), Classifier.load(run / "hf")
    _, images = test_images
    np.testing.assert_allclose(from_hf.predict_arrays(images), from_run.predict_arrays(images, tta="none"), atol=2e-4)
    assert from_hf.unknown_threshold == pytest.approx(from_run.unknown_threshold)


def test_an_ensemble_is_calibrated_on_its_combined_output_and_keeps_its_labels():
    def member(probs, temperature):
        calibrated = torch.tensor(probs).log().div(temperature).softmax(-1)
        return Classifier(["a", "b", "c"], lambda x: calibrated.repeat(len(x), 1), "m", 64, temperature=temperature)

    plain = np.array([[0.5, 0.3, 0.2], [0.2, 0.45, 0.35]])
    members = [member(plain[0], 0.5), member(plain[1], 0.8)]
    probs = average_predictions(members, np.zeros((1, 64, 64, 3), np.uint8), "none").probs
    expected = torch.tensor(plain.mean(0)).log().div(0.65).softmax(-1).numpy()
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)
    assert probs.argmax(1)[0] == plain.mean(0).argmax()


def test_the_non_bird_photos_of_the_open_set_benchmark_get_an_answer_each(trained_run):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from open_set import SKIMAGE_PHOTOS, non_bird_photos

    photos = non_bird_photos()
    assert len(photos) == 3 * len(SKIMAGE_PHOTOS)
    assert all(photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[-1] == 3 for photo in photos)
    classifier = Classifier.load(trained_run)
    _, unknown = classifier.predict_scores(np.stack([to_model_input(photo) for photo in photos]))
    assert classifier.is_unknown(unknown).shape == (len(photos),)
