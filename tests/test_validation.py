"""Validation every fraction of an epoch (``--val-every``) with patience counted in validations, and the
cosine-with-warm-restarts schedule (``--schedule cosine-restarts``)."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN

from lowres_birds.cli import main
from lowres_birds.config import load_config
from lowres_birds.errors import UserError
from lowres_birds.run_dir import RunDir
from lowres_birds.train.optim import create_scheduler, lr_factor, set_schedule_length

# 27 training images in batches of 4: 7 steps per epoch, validated after step 4 (round(0.5 * 7)) and at the end.
RUN = [
    *FAST_TRAIN[:-4],
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--seed",
    "3",
    "--hflip",
    "--crop-scale-min",
    "0.8",
    "--device",
    "cpu",
    "--lr",
    "0.01",
    "--val-every",
    "0.5",
    "--schedule",
    "cosine-restarts",
    "--restart-epochs",
    "0.5",
    "--warmup-epochs",
    "0.25",
]
TIMING_KEYS = {"train_images_per_s", "elapsed_s"}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timings(run: Path) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in records(run)]


@pytest.fixture(scope="module")
def straight_run(demo_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("val-every") / "straight"
    assert main(["train", "--data", str(demo_data), "--out", str(run), *RUN]) == 0
    return run


# --------------------------------------------------------------------------- the schedule


def test_cosine_restarts_starts_every_cycle_at_the_peak_after_the_warmup():
    factor = partial(lr_factor, schedule="cosine-restarts", warmup=4, total=100, cycle=10)
    assert (factor(0), factor(2)) == (0.0, 0.5)  # the linear warmup comes first
    for start in (4, 14, 24, 94):
        assert factor(start) == 1.0  # a cycle starts at the peak
        assert factor(start + 5) == pytest.approx(0.5)  # half way down in its middle
        assert factor(start + 9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))  # its last step is near 0
        assert factor(start + 9) < 0.025 < factor(start + 8)


def test_cosine_restarts_is_torchs_cosine_annealing_warm_restarts():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=6, T_mult=1, eta_min=0)
    for step in range(25):
        assert lr_factor(step, "cosine-restarts", 0, 25, 6) == pytest.approx(optimizer.param_groups[0]["lr"]), step
        optimizer.step()
        reference.step()


def test_restart_cycles_are_counted_in_epochs_and_survive_a_budget_plan():
    cfg = load_config("cpu", {"schedule": "cosine-restarts", "restart_epochs": 0.5, "warmup_epochs": 0, "epochs": 4})
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch=10)  # cycles of 5 steps
    expected = [lr_factor(step, "cosine-restarts", 0, 40, 5) for step in range(12)]
    set_schedule_length(scheduler, cfg, 10, 2)  # the time budget's plan: the cycles keep their length
    assert [scheduler.lr_lambdas[0](step) for step in range(12)] == expected
    assert expected[5] == expected[10] == 1.0


# --------------------------------------------------------------------------- validation every half epoch


def test_half_epoch_validation_writes_one_record_per_validation(straight_run):
    found = records(straight_run)
    assert [r["step"] for r in found] == [4, 7, 11, 14]  # the epoch ends are validated once, not twice
    assert [r["epoch"] for r in found] == [4 / 7, 1, 1 + 4 / 7, 2]
    assert all(r["train_loss"] > 0 and r["train_images_per_s"] > 0 for r in found)
    # the validated reader takes them
    assert [r["epoch"] for r in RunDir(straight_run).metrics()] == [r["epoch"] for r in found]
    checkpoint = torch.load(straight_run / "checkpoint.pt", map_location="cpu", weights_only=True)["state"]
    assert checkpoint["validations"] == 4 and checkpoint["epoch"] == 2
    assert checkpoint["best_f1"] == max(r["val_macro_f1"] for r in found)


def test_every_step_is_validated_once_when_the_share_is_one_step(demo_data, tmp_path):
    run = tmp_path / "run"
    # 27 images in batches of 9: 3 steps; a third of an epoch is one step, and the epoch's end is its third.
    assert (
        main(
            [
                "train",
                "--data",
                str(demo_data),
                "--out",
                str(run),
                *FAST_TRAIN,
                "--batch-size",
                "9",
                "--val-every",
                "0.3333",
            ]
        )
        == 0
    )
    assert [(r["epoch"], r["step"]) for r in records(run)] == [(1 / 3, 1), (2 / 3, 2), (1, 3)]


def test_resume_after_a_validation_within_an_epoch_neither_redoes_it_nor_changes_a_record(
    straight_run, demo_data, tmp_path, monkeypatch, capsys
):
    from lowres_birds.train.state import Checkpointer

    stopped = tmp_path / "stopped"
    save = Checkpointer.save

    def save_then_interrupt(self, state):
        save(self, state)
        if (state.epoch, state.step_in_epoch) == (1, 4):  # the checkpoint of the validation half way through epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    assert main(["train", "--data", str(demo_data), "--out", str(stopped), *RUN]) == 130
    monkeypatch.undo()
    assert [r["step"] for r in records(stopped)] == [4, 7, 11]
    capsys.readouterr()
    assert main(["train", "--resume", str(stopped)]) == 0
    # only the epoch's end: step 11 was validated before the stop
    assert capsys.readouterr().out.count("val macro-F1") == 1
    assert without_timings(stopped) == without_timings(straight_run)


def test_patience_counts_validations_and_can_stop_within_an_epoch(demo_data, tmp_path, monkeypatch, capsys):
    import lowres_birds.train.validation as validation

    scores, evaluate = iter([0.5, 0.6, 0.4, 0.3, 0.2, 0.9]), validation.evaluate

    def scripted(*args):
        stats, probs = evaluate(*args)
        return {**stats, "macro_f1": next(scores)}, probs

    monkeypatch.setattr(validation, "evaluate", scripted)
    run = tmp_path / "run"
    patience = ["--epochs", "3", "--early-stop-patience", "3", "--keep", "best"]
    assert main(["train", "--data", str(demo_data), "--out", str(run), *RUN, *patience]) == 0
    # Best at the 2nd validation (epoch 1); the 3rd, 4th and 5th are not better: stop at the 5th, within epoch 3.
    assert [r["step"] for r in records(run)] == [4, 7, 11, 14, 18]
    assert records(run)[-1]["epoch"] == 2 + 4 / 7
    out = capsys.readouterr().out
    assert "no better validation macro-F1 for 3 validations; stopping early" in out
    assert "kept the best weights: validation macro-F1 0.6000 (epoch 1)" in out


# --------------------------------------------------------------------------- which weights the run keeps


@pytest.fixture
def scripted_scores(monkeypatch):
    """Validation macro-F1 read 0.5, 0.9, 0.4, 0.3 (the best is the 2nd of 4, epoch 1); training is unchanged."""
    import lowres_birds.train.validation as validation

    evaluate = validation.evaluate

    def install():
        scores = iter([0.5, 0.9, 0.4, 0.3])

        def scripted(*args):
            stats, probs = evaluate(*args)
            return {**stats, "macro_f1": next(scores)}, probs

        monkeypatch.setattr(validation, "evaluate", scripted)

    return install


def test_keep_changes_which_weights_are_saved_not_how_the_run_trains(
    straight_run, scripted_scores, demo_data, tmp_path, capsys
):
    final_weights = {}
    for keep in ("best", "last"):
        scripted_scores()
        run = tmp_path / keep
        assert main(["train", "--data", str(demo_data), "--out", str(run), *RUN, "--keep", keep]) == 0
        assert [r["val_macro_f1"] for r in records(run)] == [0.5, 0.9, 0.4, 0.3]
        assert [r["train_loss"] for r in records(run)] == [r["train_loss"] for r in records(straight_run)]
        last = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
        kept = RunDir(run).weights()
        final_weights[keep] = all(torch.equal(kept[name], last[name]) for name in last)
        assert RunDir(run).kept_val_macro_f1() == {"best": 0.9, "last": 0.3}[keep]
        expected = {"best": "0.9000 (epoch 1)", "last": "0.3000 (epoch 2)"}[keep]
        assert f"kept the {keep} weights: validation macro-F1 {expected}" in capsys.readouterr().out
        card = (run / RunDir.HF / "README.md").read_text(encoding="utf-8")  # the model card names the same weights
        figure, epoch = {"best": ("0.9000", 1), "last": ("0.3000", 2)}[keep]
        assert f"kept epoch {epoch})" in card and f"| {figure} |" in card and f"`keep: {keep}`" in card
    assert final_weights == {"best": False, "last": True}


def test_a_checkpoint_written_before_keep_resumes_with_its_best_weights_kept(
    scripted_scores, demo_data, tmp_path, monkeypatch, capsys
):
    from lowres_birds.train.state import Checkpointer

    scripted_scores()
    stopped = tmp_path / "stopped"
    save = Checkpointer.save

    def save_then_interrupt(self, state):
        save(self, state)
        if (state.epoch, state.step_in_epoch) == (1, 0):  # after the 2nd validation, the best
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    assert main(["train", "--data", str(demo_data), "--out", str(stopped), *RUN, "--keep", "best"]) == 130
    monkeypatch.setattr(Checkpointer, "save", save)
    checkpoint = torch.load(stopped / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in ("kept_f1", "kept_epoch"):  # as an older version wrote it
        del checkpoint["state"][key]
    torch.save(checkpoint, stopped / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(stopped)]) == 0
    assert "kept the best weights: validation macro-F1 0.9000 (epoch 1)" in capsys.readouterr().out


# --------------------------------------------------------------------------- readers of metrics.jsonl


def test_reports_read_validations_within_epochs(straight_run, tmp_path):
    from lowres_birds.inspect.plots import curves_png
    from lowres_birds.inspect.report import read_metrics

    metrics = read_metrics(RunDir(straight_run))
    assert metrics["epoch"].tolist() == [4 / 7, 1, 1 + 4 / 7, 2]
    assert curves_png(metrics, tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("step", ["4", 0, 2.5, True])
def test_the_metrics_reader_refuses_a_damaged_step(straight_run, tmp_path, step):
    run = RunDir(tmp_path)
    lines = records(straight_run)
    lines[1]["step"] = step
    (tmp_path / RunDir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(UserError, match=r"metrics.jsonl line 2: step must be a positive whole number"):
        run.metrics()
