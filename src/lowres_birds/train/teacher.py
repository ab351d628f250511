"""The HR teacher: what the 256x256 twins can teach a 64x64 student (the test set has no twins).

``build_teacher``: the pretrained backbone, frozen, sees the HR twins at ``teacher_size``; a
logistic-regression head fitted on those features is the teacher. Its soft labels and features are the
distillation targets (losses.py). The features are cached beside the decoded images, so ablations and folds
compute them once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from lowres_birds.data.images import cache_dir
from lowres_birds.metrics import score
from lowres_birds.model.factory import create_model
from lowres_birds.model.wrapper import in_batches
from lowres_birds.run_dir import save_torch
from lowres_birds.train.degradation import array_fingerprint


@dataclass
class TeacherTargets:
    """Per training-set index: the frozen backbone's pooled HR features and the HR teacher's logits."""

    features: torch.Tensor  # N x D
    logits: torch.Tensor  # N x C
    val_macro_f1: float  # the teacher's own score on the validation HR twins


def hr_features(source: str, labels: list[str], hr_images: np.ndarray, input_size: int, pretrained: bool = True) -> torch.Tensor:
    """Pooled pre-logit features of the pretrained backbone for every HR twin (cached on disk). ``pretrained``
    False (a run with --no-pretrained: a rehearsal or a benchmark offline) gives a randomly initialised one."""
    weights = "" if pretrained else "|random-init"
    key = hashlib.sha256(f"{source}|{input_size}|{array_fingerprint(hr_images)}{weights}".encode()).hexdigest()[:20]
    cache = cache_dir() / f"teacher-{key}.pt"
    if cache.exists():
        try:
            features = torch.load(cache, weights_only=True)
            if isinstance(features, torch.Tensor) and features.ndim == 2 and len(features) == len(hr_images):
                return features
        except Exception:  # noqa: BLE001 - any damage to a cache entry means: compute it again
            pass
    model = create_model(source, labels, input_size, pretrained=pretrained).eval()
    features = torch.from_numpy(in_batches(lambda batch: model(batch, return_features=True)[0], hr_images))
    save_torch(cache, features)
    return features


def build_teacher(source: str, labels: list[str], hr_images: np.ndarray, targets: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                  input_size: int, pretrained: bool = True) -> TeacherTargets:
    """Frozen pretrained backbone on HR at ``input_size`` + logistic regression fitted on the training split."""
    from sklearn.linear_model import LogisticRegression

    features = hr_features(source, labels, hr_images, input_size, pretrained)
    head = LogisticRegression(C=0.5, max_iter=300)
    head.fit(features[train_idx].numpy(), targets[train_idx])
    logits = torch.zeros(len(features), len(labels))
    logits[:, head.classes_] = torch.from_numpy(head.decision_function(features.numpy())).float()
    val_f1 = score(targets[val_idx], logits[val_idx].argmax(1).numpy())["macro_f1"]
    return TeacherTargets(features, logits, val_f1)
