"""The cosine-with-warm-restarts schedule (``--schedule cosine-restarts``)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lowres_birds.config import load_config
from lowres_birds.train.optim import create_scheduler, lr_factor, set_schedule_length

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
