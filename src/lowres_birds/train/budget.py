"""A time budget that plans instead of cutting: after the first steps, size the run (epochs and the learning-rate
schedule) to what fits, so the schedule still ends at its floor; a recipe's budget never leaves a larger data
set with a model stopped at a high learning rate."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from lowres_birds.config import RunConfig

if TYPE_CHECKING:
    import torch
    from accelerate.scheduler import AcceleratedScheduler

MEASURED_STEPS = 20  # optimizer steps timed before planning (after one warm-up step)
SAFETY = 0.95  # plan for this share of the budget: the machine's speed drifts
VALIDATION_COST = 1 / 3  # a validation image costs about a third of a training image (forward only)


def epoch_seconds(step_s: float, steps_per_epoch: int, validation_share: float, validations_per_epoch: int) -> float:
    """One epoch's estimated time: its steps plus its validations (each of ``validation_share`` images per training
    image)."""
    return step_s * steps_per_epoch * (1 + validations_per_epoch * validation_share * VALIDATION_COST)


def plan_epochs(
    budget_s: float,
    spent_s: float,
    step_s: float,
    steps_per_epoch: int,
    steps_done: int,
    validation_share: float,
    validations_per_epoch: int,
    max_epochs: int,
) -> int:
    """Epochs that fit: the budget (minus what was spent besides the steps already taken) over one epoch's
    estimated time, training plus validation; at least 1, at most ``max_epochs``."""
    epoch_s = epoch_seconds(step_s, steps_per_epoch, validation_share, validations_per_epoch)
    available = budget_s * SAFETY - spent_s + steps_done * step_s
    return max(1, min(max_epochs, math.floor(available / epoch_s)))


class BudgetPlanner:
    """Times the first optimizer steps of a run with a budget, then plans its epochs once (the session records the
    plan) and shortens the learning-rate schedule to match; every process takes rank 0's plan."""

    def __init__(
        self,
        cfg: RunConfig,
        scheduler: torch.optim.lr_scheduler.LambdaLR | AcceleratedScheduler,
        steps_per_epoch: int,
        schedule_steps_per_epoch: int,
        validation_share: float,
        validations_per_epoch: int,
        clock_start: float,
    ):
        self.cfg, self.scheduler = cfg, scheduler
        self.steps_per_epoch, self.schedule_steps_per_epoch = steps_per_epoch, schedule_steps_per_epoch
        self.validation_share, self.validations_per_epoch = validation_share, validations_per_epoch
        self.clock_start = clock_start
        self.measured_steps = max(1, min(MEASURED_STEPS, steps_per_epoch - 1))
        self.first_step_done: float | None = None
        self.first_step = 0
        self.step_s, self.timed = 0.0, 0  # the measurement the plan rests on

    def plan(self, global_step: int, step_in_epoch: int) -> int | None:
        """Call after each optimizer step until it plans: the epochs that fit, at the step that ends the
        measurement (or the first epoch); None before."""
        now = time.perf_counter()
        if self.first_step_done is None:  # the first step (of this process) warms up: the timing starts after it
            self.first_step_done, self.first_step = now, global_step
        timed = global_step - self.first_step
        if timed < self.measured_steps and step_in_epoch < self.steps_per_epoch:
            return None
        from accelerate.utils import gather_object

        self.timed = timed
        self.step_s = (now - self.first_step_done) / timed if timed else now - self.clock_start
        epochs = plan_epochs(
            self.cfg.budget_minutes * 60,
            now - self.clock_start,
            self.step_s,
            self.steps_per_epoch,
            global_step,
            self.validation_share,
            self.validations_per_epoch,
            self.cfg.epochs,
        )
        return gather_object([epochs])[0]

    def describe(self, epochs: int) -> str:
        """The plan in one line."""
        per_epoch = epoch_seconds(self.step_s, self.steps_per_epoch, self.validation_share, self.validations_per_epoch)
        fits = (
            "all of them fit"
            if epochs == self.cfg.epochs
            else f"training {epochs} (the learning-rate schedule now ends there)"
        )
        return (
            f"time budget {self.cfg.budget_minutes:g} min: {self.step_s:.2f} s per step over the first {self.timed} "
            f"step(s), ~{per_epoch:.0f} s per epoch -> of {self.cfg.epochs} epochs {fits}"
        )

    def leave_out(self, seconds: float) -> None:
        """Keep time spent between steps (a validation within the measured steps) out of the step timing."""
        if self.first_step_done is not None:
            self.first_step_done += seconds

    def apply(self, planned_epochs: int) -> None:
        """Fit the schedule to ``planned_epochs`` (at the plan, and again after a resume; 0: not planned yet)."""
        from lowres_birds.train.optim import set_schedule_length

        if planned_epochs and planned_epochs < self.cfg.epochs:
            set_schedule_length(self.scheduler, self.cfg, self.schedule_steps_per_epoch, planned_epochs)
