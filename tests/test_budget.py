"""A time budget plans the run instead of cutting it: the epochs and the learning-rate schedule are sized after
the first steps, so the schedule still ends at its floor."""

from __future__ import annotations

import json

from conftest import FAST_TRAIN
from lowres_birds.cli import main
from lowres_birds.train.budget import SAFETY, VALIDATION_COST, plan_epochs


def test_plan_counts_the_budget_left_and_the_validation_cost():
    # 10 s/epoch of steps + 10 % validation images at a third of the cost: 10.33 s per epoch.
    epoch_s = 10 * (1 + 0.1 * VALIDATION_COST)
    assert plan_epochs(100, 1, 0.1, 100, 0, 0.1, 50) == int((100 * SAFETY - 1) / epoch_s)
    assert plan_epochs(100, 12, 0.1, 100, 20, 0.1, 50) == int((100 * SAFETY - 12 + 2) / epoch_s)
    assert plan_epochs(100, 1, 0.1, 100, 0, 0.1, 3) == 3  # never more than asked
    assert plan_epochs(1, 5, 0.1, 100, 0, 0.1, 3) == 1  # never less than one


def test_a_budget_too_short_for_the_epochs_shortens_the_schedule_to_its_floor(demo_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), *FAST_TRAIN, "--epochs", "40", "--batch-size", "4",
                 "--schedule", "cosine", "--lr", "0.01", "--budget-minutes", "0.02"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "time budget 0.02 min" in out and f"of 40 epochs training {len(records)}" in out
    assert 1 <= len(records) < 40
    assert records[-1]["lr"] < 1e-4  # the cosine schedule ended at its floor, 1 % of the way from 0.01
