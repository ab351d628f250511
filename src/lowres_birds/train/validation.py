"""Validation during training: when (every ``val_every`` of an epoch and at each epoch's end) and what follows
(one metrics.jsonl record, the best weights, the checkpoint, an early or budget stop), so the step loop only asks
``due`` after each optimizer step."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from lowres_birds.config import RunConfig
from lowres_birds.metrics import score
from lowres_birds.model.wrapper import in_batches
from lowres_birds.run_dir import RunDir
from lowres_birds.train.data import TrainingData
from lowres_birds.train.state import Checkpointer, Trainee, TrainState


def evaluate(
    model: torch.nn.Module, images: np.ndarray, targets: np.ndarray, device: torch.device
) -> tuple[dict, np.ndarray]:
    """Macro-F1 and accuracy of ``model`` on uint8 NHWC images (every process scores the whole set)."""
    model.eval()
    probs = in_batches(lambda batch: model(batch.to(device)).float().softmax(-1), images)
    return score(targets, probs.argmax(1)), probs


class TrainingMeter:
    """Mean loss and images/s of the training since the last reset (the previous validation), so a record after
    a resume at a validation equals the uninterrupted run's."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.images, self.started = 0.0, 0, time.perf_counter()

    def update(self, loss: float, images: int) -> None:
        self.loss_sum, self.images = self.loss_sum + loss * images, self.images + images

    def postfix(self) -> dict:
        """For the progress bar (this process only)."""
        return {
            "loss": f"{self.loss_sum / max(self.images, 1):.3f}",
            "img_s": f"{self.images / (time.perf_counter() - self.started):.0f}",
        }

    def stats(self, accelerator) -> dict:
        """Summed over the processes (every process must call it at the same step)."""
        elapsed = time.perf_counter() - self.started
        total = torch.tensor([self.loss_sum, self.images], dtype=torch.float64, device=accelerator.device)
        loss_sum, images = accelerator.reduce(total, "sum").tolist()
        return {"train_loss": loss_sum / max(images, 1), "train_images_per_s": images / elapsed}


class Validator:
    """Validates every ``round(val_every * steps_per_epoch)`` optimizer steps within an epoch and once at its end.
    Each validation appends a metrics.jsonl record (``epoch``: epochs trained so far, fractional within an epoch;
    ``step``: the optimizer step), keeps the best weights and validation predictions, saves the checkpoint (a resume
    never redoes it) and sets ``stopped`` when the patience (counted in validations) or the time budget runs out."""

    def __init__(
        self,
        cfg: RunConfig,
        run: RunDir,
        parts: Trainee,
        checkpointer: Checkpointer,
        data: TrainingData,
        steps_per_epoch: int,
        clock_start: float,
    ):
        self.cfg, self.run, self.parts, self.checkpointer = cfg, run, parts, checkpointer
        self.steps_per_epoch, self.clock_start = steps_per_epoch, clock_start
        self.every = max(1, round(cfg.val_every * steps_per_epoch))
        self.per_epoch = math.ceil(steps_per_epoch / self.every)  # the validations of one epoch, its end included
        self.val_idx, self.images, self.targets = (
            data.val_idx,
            np.asarray(data.lr_images[data.val_idx]),
            data.targets[data.val_idx],
        )
        self.stopped = False
        self.pace_origin: tuple[float, float] | None = None  # (epoch, elapsed_s) of this process's first validation

    def due(self, state: TrainState) -> bool:
        """A validation within the epoch after this step (the epoch's last step is validated once, at its end)."""
        return state.step_in_epoch % self.every == 0 and state.step_in_epoch < self.steps_per_epoch

    def validate(self, state: TrainState, train_stats: dict, epoch_end: bool = False) -> None:
        """Score the model (its EMA if kept) after ``train_stats``' training; at ``epoch_end`` also close the epoch."""
        from accelerate.utils import gather_object

        cfg, parts, accelerator = self.cfg, self.parts, self.parts.accelerator
        started = time.perf_counter()
        evaluated = parts.ema.module if parts.ema is not None else parts.model
        val_stats, val_probs = evaluate(evaluated, self.images, self.targets, accelerator.device)
        parts.model.train()
        state.elapsed_s = time.perf_counter() - self.clock_start
        epoch = state.epoch + 1 if epoch_end else state.epoch + state.step_in_epoch / self.steps_per_epoch
        record = {
            "epoch": epoch,
            "step": state.global_step,
            **train_stats,
            "val_macro_f1": val_stats["macro_f1"],
            "val_accuracy": val_stats["accuracy"],
            "lr": parts.scheduler.get_last_lr()[0],
            "elapsed_s": state.elapsed_s,
        }
        self._print(record, state.epochs(cfg))
        state.validations += 1
        if cfg.log != "none":  # the tracker's step counts validations: the epoch when validating once per epoch
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.validations)
        if val_stats["macro_f1"] > state.best_f1:
            state.best_f1, state.best_epoch, state.best_validation = val_stats["macro_f1"], epoch, state.validations
            if accelerator.is_main_process:
                self.run.save_weights(accelerator.unwrap_model(evaluated).state_dict())
                self.run.save_val_predictions(self.val_idx, self.targets, val_probs)
        if epoch_end:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        state.elapsed_s = gather_object([state.elapsed_s])[
            0
        ]  # rank 0's clock: every process takes the same stop decision
        if accelerator.is_main_process:
            self.run.append_metrics(
                record
            )  # before the checkpoint: a resume after a failed one redoes the validation and replaces its record
        self.checkpointer.save(state)
        self.stopped = self._should_stop(state, epoch)
        if parts.planner is not None:
            parts.planner.leave_out(time.perf_counter() - started)

    def _should_stop(self, state: TrainState, epoch: float) -> bool:
        cfg, accelerator = self.cfg, self.parts.accelerator
        if state.epoch >= state.epochs(cfg):
            return False
        if (
            cfg.budget_minutes and state.elapsed_s > cfg.budget_minutes * 60
        ):  # the plan was too optimistic (the machine slowed)
            accelerator.print(
                f"time budget of {cfg.budget_minutes:g} min exceeded after epoch {epoch:g} of {state.epochs(cfg)}; "
                "stopping"
            )
            return True
        if cfg.early_stop_patience and state.validations - state.best_validation >= cfg.early_stop_patience:
            accelerator.print(
                f"no better validation macro-F1 for {cfg.early_stop_patience} validations; stopping early"
            )
            return True
        return False

    def _print(self, record: dict, epochs: int) -> None:
        """One line per validation; the time left is paced on this process's own validations (not on a teacher's
        training or a run before a resume), on the whole elapsed time until there are two."""
        origin_epoch, origin_s = self.pace_origin or (0.0, 0.0)
        remaining = (record["elapsed_s"] - origin_s) / (record["epoch"] - origin_epoch) * (epochs - record["epoch"])
        self.pace_origin = self.pace_origin or (record["epoch"], record["elapsed_s"])
        self.parts.accelerator.print(
            f"epoch {record['epoch']:g}/{epochs}  loss {record['train_loss']:.4f}  val macro-F1 "
            f"{record['val_macro_f1']:.4f}  "
            f"acc {record['val_accuracy']:.4f}  {record['train_images_per_s']:.0f} img/s  {record['elapsed_s']:.0f}s "
            f"(~{remaining:.0f}s left)"
        )
