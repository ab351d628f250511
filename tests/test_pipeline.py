"""End to end through the CLI: train -> predict -> evaluate, and resume."""

from __future__ import annotations

import json

import pandas as pd
import yaml
from conftest import TINY_TRAIN

from lowres_birds.cli import main


def test_train_writes_a_complete_run(trained_run):
    for name in (
        "config.yaml",
        "labels.json",
        "model_spec.json",
        "split.json",
        "metrics.jsonl",
        "model.safetensors",
        "checkpoint.pt",
    ):
        assert (trained_run / name).is_file(), name
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["strategy"] == "native" and config["epochs"] == 1
    record = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= record["val_macro_f1"] <= 1.0 and record["train_images_per_s"] > 0


def test_predict_and_evaluate(trained_run, demo_data, tmp_path, capsys):
    submission, probs = tmp_path / "submission.csv", tmp_path / "probs.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(trained_run),
                "--data",
                str(demo_data),
                "--out",
                str(submission),
                "--probs",
                str(probs),
                "--tta",
                "flip",
            ]
        )
        == 0
    )
    frame = pd.read_csv(submission)
    expected_order = pd.read_csv(demo_data / "sample_submission.csv")["id"].tolist()
    assert frame.columns.tolist() == ["id", "label"] and frame["id"].tolist() == expected_order
    classes = json.loads((trained_run / "labels.json").read_text())
    assert set(frame["label"]) <= set(classes)
    probabilities = pd.read_csv(probs)
    assert probabilities.columns.tolist() == ["id", *classes, "unknown", "unknown_score"]  # the run is calibrated
    assert abs(probabilities[classes].sum(axis=1) - 1).max() < 1e-4
    assert (
        main(
            [
                "evaluate",
                "--submission",
                str(submission),
                "--labels",
                str(demo_data / "test_labels.csv"),
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "macro-F1" in capsys.readouterr().out
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000


def test_predict_refuses_to_overwrite(trained_run, demo_data, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    out.write_text("keep me")
    assert main(["predict", "--run", str(trained_run), "--data", str(demo_data), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "keep me"


def test_resume_continues_to_the_same_result(demo_data, tmp_path, monkeypatch):
    """A run stopped right after epoch 1's checkpoint (Ctrl-C arriving then) and resumed ends where an
    uninterrupted run ends."""
    from lowres_birds.train.state import Checkpointer

    common = [*TINY_TRAIN[:-6], "--epochs", "2", "--batch-size", "8", "--seed", "3", "--hflip", "--device", "cpu"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", "--data", str(demo_data), "--out", str(straight), *common]) == 0
    save = Checkpointer.save

    def save_then_interrupt(self, state):
        save(self, state)
        if state.epoch == 1 and state.step_in_epoch == 0:  # the checkpoint at the end of epoch 1
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    assert main(["train", "--data", str(demo_data), "--out", str(stopped), *common]) == 130
    monkeypatch.undo()
    assert len((stopped / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(["train", "--resume", str(stopped)]) == 0
    final = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()][-1]
    expected = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["epoch"] == 2
    assert (final["train_loss"], final["val_macro_f1"]) == (expected["train_loss"], expected["val_macro_f1"])


def test_demo_trains_the_cpu_recipe_with_its_teacher_and_scores_like_a_working_model(tmp_path, capfd, monkeypatch):
    import re

    import lowres_birds.extras

    real = lowres_birds.extras.find_spec  # as on the default install the README runs it on: no [report] extra

    def without_report(name):
        return None if name == "pytorch_grad_cam" else real(name)

    monkeypatch.setattr(lowres_birds.extras, "find_spec", without_report)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    printed, err = capfd.readouterr()
    assert "HR teacher finetuned" in printed  # the default recipe's teacher is part of the demo
    # what train writes after training too: calibrated scores with an unknown flag, the HF folder
    assert (tmp_path / "demo/run/calibration.json").is_file() and (tmp_path / "demo/run/hf").is_dir()
    assert "no calibration.json" not in err + printed and "report skipped" not in err and "report/" not in printed
    # 0.927 on 2026-11-30; a weak teacher gave 0.57
    assert float(re.search(r"^macro-F1 ([0-9.]+)", printed, re.M).group(1)) >= 0.8
