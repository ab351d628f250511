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
    assert plan_epochs(100, 1, 0.1, 100, 0, 0.1, 1, 50) == int((100 * SAFETY - 1) / epoch_s)
    assert plan_epochs(100, 12, 0.1, 100, 20, 0.1, 1, 50) == int((100 * SAFETY - 12 + 2) / epoch_s)
    assert plan_epochs(100, 1, 0.1, 100, 0, 0.1, 1, 3) == 3  # never more than asked
    assert plan_epochs(1, 5, 0.1, 100, 0, 0.1, 1, 3) == 1  # never less than one


def test_plan_counts_every_validation_of_an_epoch():
    # Validating half the training set's size 4 times an epoch (val_every 0.25) at a third of the cost: 16.67 s per
    # epoch.
    epoch_s = 10 * (1 + 4 * 0.5 * VALIDATION_COST)
    assert plan_epochs(100, 0, 0.1, 100, 0, 0.5, 4, 50) == int(100 * SAFETY / epoch_s) == 5
    assert plan_epochs(100, 0, 0.1, 100, 0, 0.5, 1, 50) == 8  # once per epoch: 11.67 s per epoch


def test_a_budget_too_short_for_the_epochs_shortens_the_schedule_to_its_floor(demo_data, tmp_path, capsys, monkeypatch):
    import types

    import lowres_birds.train.budget as budget
    import lowres_birds.train.session as session
    import lowres_birds.train.validation as validation

    # The training clock advances 10 ms per reading, whatever the machine's load: the plan and the budget check agree.
    ticks = iter(range(10**9))
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks) / 100)
    for module in (budget, session, validation):
        monkeypatch.setattr(module, "time", clock)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(demo_data),
                "--out",
                str(run),
                *FAST_TRAIN,
                "--epochs",
                "40",
                "--batch-size",
                "4",
                "--schedule",
                "cosine",
                "--lr",
                "0.01",
                "--budget-minutes",
                "0.02",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "time budget 0.02 min" in out and f"of 40 epochs training {len(records)}" in out
    assert 1 <= len(records) < 40
    assert records[-1]["lr"] < 1e-4  # the cosine schedule ended at its floor, 1 % of the way from 0.01


def test_the_step_timing_leaves_out_a_validation_within_the_measured_steps(monkeypatch):
    import torch

    import lowres_birds.train.budget as budget
    from lowres_birds.config import load_config
    from lowres_birds.train.optim import create_scheduler

    cfg = load_config("cpu", {"budget_minutes": 1, "epochs": 50})
    scheduler = create_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), cfg, 100)
    planner = budget.BudgetPlanner(cfg, scheduler, 100, 100, 0.0, 1, clock_start=0.0)
    clock, planned = [0.0], []
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    for step in range(1, 22):  # steps of 0.1 s; a 5 s validation after step 5
        clock[0] += 0.1
        planned.append(planner.plan(global_step=step, step_in_epoch=step))
        if step == 5:
            clock[0] += 5
            planner.leave_out(5)
    # Timed at 0.1 s per step (not 0.35): (57 s - 7.1 s spent + 2.1 s of steps) / 10 s per epoch.
    assert planned[-1] == 5 and planned[:-1] == [None] * 20
