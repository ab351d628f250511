"""Validation during training: when it is due (every ``val_every`` of an epoch, and at each epoch's end) and the
scores; what follows from them (records, best weights, checkpoint, stop) is the session's (session.py)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from lowres_birds.errors import UserError
from lowres_birds.metrics import score
from lowres_birds.model.wrapper import in_batches
from lowres_birds.train.data import TrainingData

if TYPE_CHECKING:
    from accelerate import Accelerator


def evaluate(
    model: torch.nn.Module, images: np.ndarray, targets: np.ndarray, device: torch.device
) -> tuple[dict, np.ndarray]:
    """Macro-F1 and accuracy of ``model`` on uint8 NHWC images (every process scores the whole set); weights that
    overflowed (the last step's loss was finite, its update not) are refused rather than scored."""
    model.eval()
    probs = in_batches(lambda batch: model(batch.to(device)).float().softmax(-1), images)
    if not np.isfinite(probs).all():
        raise UserError(
            "training diverged: the model answers nan/inf on its validation images (its weights overflowed); lower "
            "--lr (or use --mixed-precision no) and train again"
        )
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

    def stats(self, accelerator: Accelerator) -> dict:
        """Summed over the processes (every process must call it at the same step)."""
        elapsed = time.perf_counter() - self.started
        total = torch.tensor([self.loss_sum, self.images], dtype=torch.float64, device=accelerator.device)
        loss_sum, images = accelerator.reduce(total, "sum").tolist()
        return {"train_loss": loss_sum / max(images, 1), "train_images_per_s": images / elapsed}


class Validator:
    """The validation split's images and targets, and the schedule of validations: every
    ``round(val_every * steps_per_epoch)`` optimizer steps within an epoch, and once at its end."""

    def __init__(self, data: TrainingData, steps_per_epoch: int, val_every: float):
        self.steps_per_epoch = steps_per_epoch
        self.every = max(1, round(val_every * steps_per_epoch))
        self.per_epoch = math.ceil(steps_per_epoch / self.every)  # the validations of one epoch, its end included
        self.val_idx = data.val_idx
        self.images, self.targets = np.asarray(data.lr_images[data.val_idx]), data.targets[data.val_idx]

    def due(self, step_in_epoch: int) -> bool:
        """A validation within the epoch after this step (the epoch's last step is validated once, at its end)."""
        return step_in_epoch % self.every == 0 and step_in_epoch < self.steps_per_epoch

    def score(self, model: torch.nn.Module, device: torch.device) -> tuple[dict, np.ndarray]:
        """(macro-F1 and accuracy, probabilities) of ``model`` on the validation split."""
        return evaluate(model, self.images, self.targets, device)
