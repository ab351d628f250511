"""The training loss: cross-entropy on (mixed, smoothed) labels, optionally class-balanced, plus the two
distillation terms."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lowres_birds.config import RunConfig
from lowres_birds.train.batches import Targets


def class_balanced_weights(counts: np.ndarray, beta: float) -> torch.Tensor:
    """Per-class cross-entropy weights by the effective number of samples (Cui et al., CVPR 2019):
    (1 - beta) / (1 - beta^n_c), normalised to mean 1 over the classes. ``counts``: images per class in the training
    split (a class with none is weighted as if it had one)."""
    effective = 1.0 - np.power(beta, np.maximum(np.asarray(counts, dtype=np.float64), 1.0))
    weights = (1.0 - beta) / effective
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term T^2 * KL(teacher || student_T), batch-mean.

    ``teacher_probs`` are already softened (softmax(teacher_logits / T)) so that MixUp/CutMix can mix them.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """MSE to the HR features, relative to their mean square, so the weight does not depend on scale."""
    return F.mse_loss(student_features, teacher_features) / teacher_features.pow(2).mean().clamp_min(1e-8)


def total_loss(
    logits: torch.Tensor,
    features: torch.Tensor | None,
    targets: Targets,
    cfg: RunConfig,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(1 - kd_weight) * CE + kd_weight * KD + feature_kd_weight * feature matching; absent targets drop their term.
    ``class_weights`` (see :func:`class_balanced_weights`) weigh the cross-entropy's classes."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets.labels, weight=class_weights, label_smoothing=cfg.label_smoothing)
    if targets.teacher_probs is not None and cfg.kd_weight > 0:
        loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd_loss(logits, targets.teacher_probs, cfg.kd_temperature)
    if targets.teacher_features is not None and features is not None and cfg.feature_kd_weight > 0:
        loss = loss + cfg.feature_kd_weight * feature_loss(features.float(), targets.teacher_features)
    return loss
