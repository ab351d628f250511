"""Scores: a submission against labels (which may cover part of the test set), or trained models on a
labelled ImageFolder (as timm's validate.py or ``yolo val``) or on the labelled images of a competition-layout test
set. All print and write the same things: macro-F1, accuracy, the per-class table and the confusion matrix."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from lowres_birds.data.tables import check_ids, is_image_folder, load_image_folder, load_test_table, read_csv
from lowres_birds.errors import UserError
from lowres_birds.inspect.plots import confusion_matrix_png
from lowres_birds.metrics import per_class_table, score
from lowres_birds.predict.classifier import predict_files
from lowres_birds.run_dir import check_output, write_csv


def align_submission(
    submission_path: Path, labels_path: Path, test_ids: list[str] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(ids, true labels, predicted labels) over the labelled ids; mismatched ids are refused.

    The labels may cover only part of the test set (a public half), so submission ids without a label
    are fine as long as they belong to the test set: ``test_ids`` when given, else the labels' ids.
    """
    submission = check_ids(read_csv(Path(submission_path), ("id", "label")), submission_path)
    truth = read_labels(labels_path)
    predicted = dict(zip(submission["id"], submission["label"]))
    known = set(test_ids) if test_ids is not None else set(truth["id"])
    missing = [i for i in truth["id"] if i not in predicted]
    extra = [i for i in submission["id"] if i not in known]
    if missing or extra:
        example = missing[0] if missing else extra[0]
        raise UserError(
            f"{submission_path}: ids do not match {Path(labels_path).name}: {len(missing)} missing, {len(extra)} extra "
            f"(first: {example}); predict on the test set the labels come from"
            + (
                ""
                if test_ids is not None or missing
                else ", or pass --data TEST_FOLDER when the labels cover part of it"
            )
        )
    empty = [i for i in truth["id"] if predicted[i] == ""]
    if empty:
        raise UserError(f"{submission_path}: {len(empty)} row(s) with an empty label (first id: {empty[0]})")
    return truth["id"].tolist(), truth["label"].tolist(), [predicted[i] for i in truth["id"]]


def read_labels(labels_path: Path) -> pd.DataFrame:
    """The id,label table of the true labels: unique ids, every label given."""
    truth = check_ids(read_csv(Path(labels_path), ("id", "label")), labels_path)
    blank = truth.index[truth["label"] == ""]
    if len(blank):
        raise UserError(
            f"{labels_path} row {blank[0] + 2}: empty label (blank or spaces only); give every labelled id its class"
        )
    return truth


def evaluate_submission(submission: Path, labels: Path, test_dir: Path | None, out_dir: Path, force: bool) -> dict:
    """Print the per-class table and scores; write per_class.csv and confusion_matrix.png into ``out_dir``."""
    table_path, png_path = out_dir / "per_class.csv", out_dir / "confusion_matrix.png"
    for path in (table_path, png_path):
        check_output(path, force, others=[("--submission", submission), ("--labels", labels)])
    test_ids = load_test_table(test_dir).ids if test_dir else None
    ids, truth, predicted = align_submission(submission, labels, test_ids)
    return report_scores(ids, truth, predicted, out_dir)


def evaluate_models(
    sources: list[Path],
    weights: list[float] | None,
    data: Path,
    out_dir: Path,
    force: bool,
    tta: str | None = None,
    device: str = "cpu",
    labels_path: Path | None = None,
) -> dict:
    """Predict every image of a labelled ImageFolder (DIR/<class>/*.jpg), or with ``labels_path`` (id,label, which
    may cover part of the test set) the labelled images of the competition-layout test folder ``data``, with the
    models (averaged, or weighted by ``weights``) and score them."""
    if labels_path is None and not is_image_folder(data):
        raise UserError(
            f"{data} is not a labelled ImageFolder (DIR/<class>/*.jpg without train.csv or test.csv); for a test set "
            "in the competition layout pass its labels too: --labels CSV"
        )
    for path in (out_dir / "per_class.csv", out_dir / "confusion_matrix.png"):
        # before minutes of predicting
        inputs = [("--data", data), ("--labels", labels_path), *(("--run", source) for source in sources)]
        check_output(path, force, others=[(flag, value) for flag, value in inputs if value is not None])
    if labels_path is None:
        table = load_image_folder(data)
        ids, truth, paths = table.ids, table.labels, table.lr_paths
    else:
        ids, truth, paths = labelled_test_images(read_labels(labels_path), labels_path, data)
    predictions = predict_files(sources, paths, tta=tta, device=device, weights=weights)
    labels, probs = predictions.labels, predictions.probs
    unknown = sorted(set(truth) - set(labels))
    if unknown:
        count = sum(label in unknown for label in truth)
        warnings.warn(
            f"{count} image(s) of {len(unknown)} class(es) the model was not trained on (first: {unknown[0]!r}) count "
            "as errors",
            stacklevel=2,
        )
    return report_scores(ids, truth, [labels[i] for i in probs.argmax(1)], out_dir)


def labelled_test_images(truth: pd.DataFrame, labels_path: Path, test_dir: Path) -> tuple[list, list, list]:
    """(ids, true labels, image paths) of the labelled ids of the test folder ``test_dir``; ids it lacks are
    refused."""
    table = load_test_table(test_dir)
    position = {image_id: row for row, image_id in enumerate(table.ids)}
    outside = [image_id for image_id in truth["id"] if image_id not in position]
    if outside:
        raise UserError(
            f"{labels_path}: {len(outside)} id(s) not in {Path(test_dir) / 'test.csv'} (first: {outside[0]}); pass "
            "--data, the test folder these labels come from"
        )
    ids = truth["id"].tolist()
    return ids, truth["label"].tolist(), [table.lr_paths[position[image_id]] for image_id in ids]


def report_scores(ids: list[str], truth: list[str], predicted: list[str], out_dir: Path) -> dict:
    """Print the per-class table and scores; write per_class.csv and confusion_matrix.png into ``out_dir`` (the
    callers checked both outputs before any work)."""
    table_path, png_path = out_dir / "per_class.csv", out_dir / "confusion_matrix.png"
    classes = sorted(set(truth) | set(predicted))
    result = score(truth, predicted)
    table = per_class_table(truth, predicted, classes)
    write_csv(table_path, table)
    confusion_matrix_png(truth, predicted, classes, png_path)
    print(table.sort_values("f1").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nscored {len(ids)} labelled images over {len(classes)} classes")
    print(f"macro-F1 {result['macro_f1']:.4f}  accuracy {result['accuracy']:.4f}")
    print(f"confusion matrix: {png_path}; per-class table: {table_path}")
    return result
