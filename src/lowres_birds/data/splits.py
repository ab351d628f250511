"""Validation splits: the stratified hold-out and stratified K folds, both fixed by the seed."""

from __future__ import annotations

import numpy as np

from lowres_birds.errors import UserError


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified hold-out indices (train, val), fixed by seed; every class keeps at least one training image."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    n_classes = len(np.unique(labels))
    n_val = max(int(round(val_fraction * len(labels))), n_classes)
    if n_val >= len(labels) - n_classes + 1:
        raise UserError(
            f"{len(labels)} images are too few for a stratified validation split over {n_classes} classes; add images"
        )
    train_idx, val_idx = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


def fold_indices(targets: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of fold ``fold`` of a stratified K-fold split fixed by seed."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(targets).min())
    if smallest < folds:
        raise UserError(f"--folds {folds} needs at least {folds} images in every class (the smallest has {smallest})")
    splits = list(
        StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(targets)), targets)
    )
    train_idx, val_idx = splits[fold]
    return np.sort(train_idx), np.sort(val_idx)
