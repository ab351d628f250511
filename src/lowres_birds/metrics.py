"""Scores: macro-F1 (the competition metric), accuracy and the per-class table, via scikit-learn."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def score(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Macro-F1 over the classes present in y_true or y_pred, as the competition computed it."""
    return {
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def per_class_table(y_true: ArrayLike, y_pred: ArrayLike, classes: list[str]) -> pd.DataFrame:
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    return pd.DataFrame({"label": classes, "precision": precision, "recall": recall, "f1": f1, "support": support})
