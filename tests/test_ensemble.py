"""Ensembles: probabilities averaged over models, or weighted by each run's validation macro-F1 (--ensemble f1);
a folds folder (train --folds) stands for its fold runs."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import FAST_TRAIN

from lowres_birds.cli import main
from lowres_birds.config import load_config
from lowres_birds.predict.classifier import Classifier, average_predictions, describe_ensemble, resolve_ensemble
from lowres_birds.run_dir import FoldsDir, RunDir


def _record(epoch: int, f1: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0,
        "train_images_per_s": 10.0,
        "val_macro_f1": f1,
        "val_accuracy": f1,
        "elapsed_s": 1.0,
    }


def _run_with_scores(folder, *f1s: float, keep: str = "best"):
    run = RunDir(folder)
    run.path.mkdir(parents=True)
    run.write_config(load_config("cpu", {"keep": keep}))
    for epoch, f1 in enumerate(f1s, start=1):
        run.append_metrics(_record(epoch, f1))
    return run.path


def _folds_folder(folder, *best_f1s: float):
    for k, f1 in enumerate(best_f1s):
        _run_with_scores(FoldsDir(folder).fold(k), f1 / 2, f1)
    FoldsDir(folder).write_summary({"folds": len(best_f1s)})
    return folder


def test_weights_are_best_validation_f1_normalised_and_weigh_the_probabilities(tmp_path):
    good, poor = _run_with_scores(tmp_path / "good", 0.3, 0.6, 0.5), _run_with_scores(tmp_path / "poor", 0.2)
    members, weights = resolve_ensemble([good, poor], "f1")
    assert members == [good, poor]
    np.testing.assert_allclose(weights, [0.75, 0.25])  # 0.6 (its best epoch) and 0.2
    last = _run_with_scores(tmp_path / "last", 0.3, 0.6, 0.2, keep="last")
    np.testing.assert_allclose(resolve_ensemble([good, last], "f1")[1], [0.75, 0.25])  # it kept the last: 0.2
    assert (
        describe_ensemble(members, weights)
        == f"ensemble of 2 (weighted by validation macro-F1): {good} 0.750, {poor} 0.250"
    )

    first = Classifier(["a", "b"], lambda x: np.tile([0.9, 0.1], (len(x), 1)), "first", 64)
    second = Classifier(["a", "b"], lambda x: np.tile([0.1, 0.9], (len(x), 1)), "second", 64)
    images = np.zeros((2, 64, 64, 3), np.uint8)
    weighted = average_predictions([first, second], images, "none", weights).probs
    np.testing.assert_allclose(weighted, np.tile([0.7, 0.3], (2, 1)))


def test_mean_is_the_plain_mean_and_needs_no_scores(tmp_path):
    members, weights = resolve_ensemble([tmp_path / "model.onnx", tmp_path / "run"], "mean")
    assert members == [tmp_path / "model.onnx", tmp_path / "run"] and weights is None
    assert describe_ensemble(members, weights).endswith(f"(plain mean): {members[0]} 0.500, {members[1]} 0.500")
    classifiers = [
        Classifier(["a", "b"], lambda x, p=p: np.tile([p, 1 - p], (len(x), 1)), str(p), 64) for p in (0.1, 0.2, 0.6)
    ]
    probs = average_predictions(classifiers, np.zeros((1, 64, 64, 3), np.uint8), "none").probs
    # as before weights (to float32 rounding: the mean goes through log and softmax, as a calibrated one does)
    np.testing.assert_allclose(
        probs, np.mean(np.array([[[0.1, 0.9]], [[0.2, 0.8]], [[0.6, 0.4]]], np.float32), axis=0), atol=1e-6
    )


def test_a_folds_folder_expands_to_its_fold_runs(tmp_path):
    eva, beit = _folds_folder(tmp_path / "eva", 0.8, 0.6, 0.6), _folds_folder(tmp_path / "beit", 0.5, 0.5)
    single = _run_with_scores(tmp_path / "single", 0.5)
    members, weights = resolve_ensemble([eva, beit, single], "f1")
    assert members == [eva / "fold0", eva / "fold1", eva / "fold2", beit / "fold0", beit / "fold1", single]
    np.testing.assert_allclose(weights, np.array([0.8, 0.6, 0.6, 0.5, 0.5, 0.5]) / 3.5)
    assert resolve_ensemble([eva], "mean") == ([eva / "fold0", eva / "fold1", eva / "fold2"], None)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("onnx", "is an ONNX file, which records none: pass its run folder or use --ensemble mean"),
        ("hf-folder", "is an exported Hugging Face folder, which records none"),
        ("no-metrics", "has no metrics.jsonl with a validation"),
        ("all-zero", "every model's validation macro-F1 is 0"),
        ("missing-fold", "counts 3 folds but"),
    ],
)
def test_ensemble_refusals_are_one_line_naming_the_model(case, expected, demo_data, tmp_path, capsys):
    folds = _folds_folder(tmp_path / "folds", 0.5, 0.5)
    member = {
        "onnx": ["--onnx", tmp_path / "model.onnx"],
        "hf-folder": ["--run", tmp_path / "hf"],
        "no-metrics": ["--run", tmp_path / "empty"],
        "all-zero": ["--run", _run_with_scores(tmp_path / "zero", 0.0)],
        "missing-fold": ["--run", folds],
    }[case]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    if case == "missing-fold":
        FoldsDir(folds).write_summary({"folds": 3})
    other = [] if case == "all-zero" else ["--run", str(folds / "fold0")]
    args = [
        "predict",
        *other,
        *map(str, member),
        "--data",
        str(demo_data),
        "--out",
        str(tmp_path / "s.csv"),
        "--ensemble",
        "f1",
    ]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and expected in error and (case == "all-zero" or str(member[1]) in error), error
    assert not (tmp_path / "s.csv").exists()


@pytest.fixture(scope="module")
def fast_run(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ensemble") / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), *FAST_TRAIN, "--seed", "3"]) == 0
    return run


def test_predict_and_evaluate_weigh_a_folds_folder_by_fold_f1(fast_run, demo_data, tmp_path, capsys):
    """Two copies of one run in a folds folder, one made worse on paper: weights 0.8 / 0.2 are announced and used."""
    folds = FoldsDir(tmp_path / "folds")
    for k, f1 in enumerate((0.8, 0.2)):
        shutil.copytree(fast_run, folds.fold(k))
        (folds.fold(k) / RunDir.METRICS).write_text(json.dumps(_record(1, f1)) + "\n")
    folds.write_summary({"folds": 2})
    probs_csv = tmp_path / "probs.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(folds.path),
                "--ensemble",
                "f1",
                "--data",
                str(demo_data),
                "--out",
                str(tmp_path / "s.csv"),
                "--probs",
                str(probs_csv),
                "--tta",
                "flip",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"ensemble of 2 (weighted by validation macro-F1): {folds.fold(0)} 0.800, {folds.fold(1)} 0.200" in out
    single = tmp_path / "single.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(fast_run),
                "--data",
                str(demo_data),
                "--out",
                str(tmp_path / "one.csv"),
                "--probs",
                str(single),
                "--tta",
                "flip",
            ]
        )
        == 0
    )
    assert "ensemble" not in capsys.readouterr().out  # one model: nothing to announce
    np.testing.assert_allclose(  # probabilities, then the unknown flag and score (~100s: float32's relative 1e-6)
        pd.read_csv(probs_csv).iloc[:, 1:].to_numpy(), pd.read_csv(single).iloc[:, 1:].to_numpy(), rtol=1e-6, atol=1e-6
    )

    image_folder = tmp_path / "imagefolder"
    for row in pd.read_csv(demo_data / "test_labels.csv").itertuples():
        (image_folder / row.label).mkdir(parents=True, exist_ok=True)
        (image_folder / row.label / f"{row.id}.jpg").symlink_to(demo_data / "test" / f"{row.id}.jpg")
    scores = []
    for run in ([str(folds.path), "--ensemble", "f1"], [str(fast_run)]):
        assert (
            main(
                [
                    "evaluate",
                    "--run",
                    *run,
                    "--data",
                    str(image_folder),
                    "--out-dir",
                    str(tmp_path / f"eval{len(scores)}"),
                ]
            )
            == 0
        )
        scores.append(re.search(r"macro-F1 \S+  accuracy \S+", capsys.readouterr().out).group(0))
    assert scores[0] == scores[1]
