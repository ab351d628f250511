"""Scores: macro-F1 (the competition metric) and accuracy, via scikit-learn; submission checking."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from lowres_birds.data import read_csv
from lowres_birds.errors import UserError


def score(y_true, y_pred) -> dict[str, float]:
    """Macro-F1 over the classes present in y_true or y_pred, as the competition computed it."""
    return {
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def per_class_table(y_true, y_pred, classes: list[str]) -> pd.DataFrame:
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    return pd.DataFrame({"label": classes, "precision": precision, "recall": recall, "f1": f1, "support": support})


def align_submission(
    submission_path: Path, labels_path: Path, test_ids: list[str] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(ids, true labels, predicted labels) over the labelled ids; mismatched ids are refused.

    The labels may cover only part of the test set (a public half), so submission ids without a label
    are fine as long as they belong to the test set: ``test_ids`` when given, else the labels' ids.
    """
    submission = read_csv(Path(submission_path), ("id", "label"))
    truth = read_csv(Path(labels_path), ("id", "label"))
    for frame, path in ((submission, submission_path), (truth, labels_path)):
        duplicated = frame["id"][frame["id"].duplicated()]
        if len(duplicated):
            raise UserError(f"{path}: duplicate id {duplicated.iloc[0]!r}; ids must be unique")
    predicted = dict(zip(submission["id"], submission["label"]))
    known = set(test_ids) if test_ids is not None else set(truth["id"])
    missing = [i for i in truth["id"] if i not in predicted]
    extra = [i for i in submission["id"] if i not in known]
    if missing or extra:
        example = missing[0] if missing else extra[0]
        raise UserError(
            f"{submission_path}: ids do not match {Path(labels_path).name}: {len(missing)} missing, {len(extra)} extra "
            f"(first: {example}); predict on the test set the labels come from"
            + ("" if test_ids is not None or missing else ", or pass --data TEST_FOLDER when the labels cover part of it")
        )
    empty = [i for i in truth["id"] if predicted[i] == ""]
    if empty:
        raise UserError(f"{submission_path}: {len(empty)} row(s) with an empty label (first id: {empty[0]})")
    return truth["id"].tolist(), truth["label"].tolist(), [predicted[i] for i in truth["id"]]
