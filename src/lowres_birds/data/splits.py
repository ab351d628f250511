"""Validation splits: the stratified hold-out and stratified K folds, both fixed by the seed, and a trained run's
split read back against its data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowres_birds.config import LR_SIZE
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import ImageTable, LabelMap, load_train_table
from lowres_birds.errors import UserError
from lowres_birds.run_dir import RunDir


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


def check_folds(targets: np.ndarray, folds: int) -> None:
    """Refuse a stratified K-fold split some class is too small for."""
    smallest = int(np.bincount(targets).min())
    if smallest < folds:
        raise UserError(f"--folds {folds} needs at least {folds} images in every class (the smallest has {smallest})")


def fold_indices(targets: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of fold ``fold`` of a stratified K-fold split fixed by seed."""
    from sklearn.model_selection import StratifiedKFold

    check_folds(targets, folds)
    splits = list(
        StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(targets)), targets)
    )
    train_idx, val_idx = splits[fold]
    return np.sort(train_idx), np.sort(val_idx)


@dataclass
class RunSplit:
    """A trained run's split read back against its data: the rows of the table it trained and validated on."""

    table: ImageTable
    train_rows: np.ndarray
    val_rows: np.ndarray

    def lr_images(self, rows: np.ndarray) -> np.ndarray:
        """uint8 N x 64 x 64 x 3 of ``rows`` (only those are read from the memory-mapped image cache)."""
        return np.asarray(load_images(self.table.lr_paths, LR_SIZE)[np.asarray(rows, dtype=np.int64)])

    def val_targets(self, labels: list[str]) -> np.ndarray:
        """The validation rows' class indices among the run's ``labels``."""
        return LabelMap(tuple(labels)).encode([self.table.labels[i] for i in self.val_rows])


def run_split(run: RunDir, data_dir: Path | None = None) -> RunSplit:
    """The run's training and validation rows in its data (``data_dir``, else the folder it was trained on):
    refused in one line when the data lacks a validation id of split.json or labels one with a class the run does
    not know."""
    data_dir = run.data_dir(data_dir)
    table = load_train_table(data_dir)
    val_ids = run.split()["val_ids"]
    position = {image_id: i for i, image_id in enumerate(table.ids)}
    missing = [i for i in val_ids if i not in position]
    if missing:
        raise UserError(
            f"{data_dir} lacks {len(missing)} validation id(s) listed in {run / RunDir.SPLIT} (first: {missing[0]}); "
            "pass the data folder the run was trained on (--data)"
        )
    val_rows = np.array([position[i] for i in val_ids], dtype=np.int64)
    unknown = sorted({table.labels[i] for i in val_rows} - set(run.labels()))
    if unknown:
        raise UserError(
            f"{data_dir} labels validation images {unknown[0]!r}, a class {run.path} was not trained on; pass the "
            "run's data folder"
        )
    held_out = set(val_ids)
    train_rows = np.array([i for i, image_id in enumerate(table.ids) if image_id not in held_out], dtype=np.int64)
    return RunSplit(table, train_rows, val_rows)
