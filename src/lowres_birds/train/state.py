"""Training state and its one checkpoint: the loop counters (changed by session.py alone), the prepared parts a
step changes, every RNG, and SIGINT/SIGTERM handling. Saved as tensors and plain types only, so a resume loads it
with ``weights_only=True``."""

from __future__ import annotations

import dataclasses
import random
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lowres_birds.errors import UserError
from lowres_birds.run_dir import RunDir
from lowres_birds.train.data import HRSupport

if TYPE_CHECKING:
    from types import FrameType


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or next to run)
    step_in_epoch: int = 0  # optimizer steps already done in that epoch
    global_step: int = 0
    best_f1: float = -1.0
    best_epoch: float = -1  # the best validation's epoch (fractional within an epoch)
    validations: int = 0  # validations done (early_stop_patience counts them)
    best_validation: int = 0  # which of them was the best (1-based)
    kept_f1: float = -1.0  # the validation macro-F1 of the weights saved in the run folder (config keep: best or last)
    kept_epoch: float = -1
    elapsed_s: float = 0.0
    planned_epochs: int = 0  # set once by the time-budget planner (0: no budget, or not planned yet)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the step loop saves a checkpoint and stops cleanly."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Trainee:
    """Everything a step changes, prepared by accelerate; the Checkpointer saves and restores all of it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: object
    generator: torch.Generator
    ema: torch.nn.Module | None
    hr: HRSupport
    class_weights: torch.Tensor | None  # class-balanced cross-entropy weights, fixed for the run (None: plain)


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG as tensors and plain types (a checkpoint is loaded with weights_only=True)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "augment": generator.get_state(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])


class Checkpointer:
    """The one checkpoint dict of a run: written by the main process through RunDir, restored on resume."""

    def __init__(self, run: RunDir, parts: Trainee):
        self.run, self.parts = run, parts

    def exists(self) -> bool:
        return self.run.has_checkpoint()

    def save(self, state: TrainState) -> None:
        from accelerate.utils import gather_object

        parts = self.parts
        rng_states = gather_object([rng_state(parts.generator)])
        if parts.accelerator.is_main_process:
            self.run.save_checkpoint(
                {
                    "model": parts.accelerator.unwrap_model(parts.model).state_dict(),
                    "optimizer": parts.optimizer.state_dict(),
                    "scheduler": parts.scheduler.state_dict(),
                    "state": dataclasses.asdict(state),
                    "rng": rng_states,
                    "ema": parts.ema.state_dict() if parts.ema is not None else None,
                }
            )

    def restore(self) -> TrainState:
        parts, checkpoint = self.parts, self.run.checkpoint()
        try:
            parts.accelerator.unwrap_model(parts.model).load_state_dict(checkpoint["model"])
            parts.optimizer.load_state_dict(checkpoint["optimizer"])
            parts.scheduler.load_state_dict(checkpoint["scheduler"])
            if parts.ema is not None:
                parts.ema.load_state_dict(checkpoint["ema"])
            state = TrainState(**checkpoint["state"])
            if "kept_f1" not in checkpoint["state"]:  # a checkpoint of a version that kept the best weights alone
                state.kept_f1, state.kept_epoch = state.best_f1, state.best_epoch
            rng = checkpoint["rng"]
            restore_rng(rng[min(parts.accelerator.process_index, len(rng) - 1)], parts.generator)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise UserError(
                f"{self.run / RunDir.CHECKPOINT} does not fit this run ({type(exc).__name__}); it is damaged: start a "
                "new run"
            ) from None
        return state
