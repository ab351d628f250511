"""Fit a finished run's calibration from the run folder and its data (``lowres-birds calibrate``, and the end of
every ``train``): the temperature by NLL on the validation split, the unknown score's statistics on the pooled
features of the training split, and its threshold on the validation split (``KEEP_KNOWN`` of its images known).
An ensemble (members or folds folder) is calibrated member by member: each run's own temperature and threshold on its
own held-out split, fitted on the answers of the TTA the folder records; ``Classifier.combine`` then combines them.
A run started from other runs (``init_from``, e.g. cpu-best's soup student) whose validation images they trained on
cannot fit its calibration there (its answers on them are those of a network that saw them): it takes the mean of
its starting runs' temperatures, each fitted on that run's own held-out split, and sets its unknown threshold to keep
the share of its validation images that they keep at their own thresholds (more than ``KEEP_KNOWN``: seen images
look familiar), so that photos it never saw are flagged about as often as ``1 - KEEP_KNOWN``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from lowres_birds.data.splits import RunSplit, run_split
from lowres_birds.data.tables import LabelMap
from lowres_birds.errors import UserError
from lowres_birds.model.calibration import (
    DEFAULT_SCORE,
    KEEP_KNOWN,
    LOGIT_DEFAULT_SCORE,
    SCORES,
    STATISTICS,
    UNFITTED,
    CalibratedHead,
    expected_calibration_error,
    feature_statistics,
    fit_temperature,
    negative_log_likelihood,
    threshold_keeping,
    without_errors,
)
from lowres_birds.model.factory import load_run_model
from lowres_birds.model.wrapper import BirdNet, pooled_outputs
from lowres_birds.run_dir import RunDir, model_folders, recorded_prediction

_TOLD_UNCALIBRATED: set[str] = set()  # runs whose missing calibration was already reported
Views = list[tuple[torch.Tensor | None, torch.Tensor]]  # (pooled features, logits) of images, then of their mirrors
HELD_OUT_SHARE = 0.9  # of a run's validation images its starting runs must not have trained on to fit its calibration


def fit_run(run_dir: Path, data_dir: Path | None = None, score: str | None = None, tta: str = "none") -> dict:
    """Fit and save one run folder's calibration (calibration.json + unknown.safetensors); returns calibration.json's
    contents. ``score``: the unknown score (default: DEFAULT_SCORE, or LOGIT_DEFAULT_SCORE without pooled features);
    ``tta`` flip: the temperature and the threshold fitted on flip-TTA answers (those of an ensemble predicting with
    flip: its flip-averaged probabilities are less confident than one pass's, so one pass's temperature leaves them
    miscalibrated; on cub100-lr's cpu-best ECE 0.039 instead of 0.028 without TTA)."""
    run = RunDir(run_dir).require()
    model, labels = load_run_model(run.path)
    score = score or (DEFAULT_SCORE if model.feature_width is not None else LOGIT_DEFAULT_SCORE)
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}: use one of {', '.join(SCORES)}")
    if score in STATISTICS and model.feature_width is None:
        raise UserError(f"the score {score} needs pooled features, which {model.spec.source} does not give; use energy")
    split = run_split(run, data_dir)
    val_targets = split.val_targets(labels)
    starts = starting_runs_trained_on_validation(run, split)
    keep, unfitted = KEEP_KNOWN, False
    with torch.no_grad():
        views = validation_views(model, split, tta)
        statistics = training_statistics(model, split, labels, score)
        if starts:
            images = split.lr_images(split.val_rows)
            fits = [held_out_fit(start, data_dir, tta, score, images) for start in starts]
            temperature = sum(fitted for fitted, _ in fits) / len(fits)
            keep = sum(kept for _, kept in fits) / len(fits)
        else:
            temperature = views_temperature(views, val_targets)
            unfitted = without_errors(val_targets, *(logits for _, logits in views))  # then T = 1
        head = CalibratedHead(temperature, score, statistics)
        before = sum(logits.softmax(-1) for _, logits in views).numpy() / len(views)
        after, unknown = answers(head, views)
    calibration = {
        "temperature": temperature,
        "tta": tta,
        "score": score,
        "threshold": threshold_keeping(unknown, keep),
        "keep_known": keep,
        **({"temperature_from": [str(start.path) for start in starts]} if starts else {}),
        **({"unfitted": True} if unfitted else {}),
        "validation": {
            "images": len(val_targets),
            "ece_before": expected_calibration_error(before, val_targets),
            "ece_after": expected_calibration_error(after, val_targets),
            "nll_before": negative_log_likelihood(before, val_targets),
            "nll_after": negative_log_likelihood(after, val_targets),
        },
    }
    run.write_calibration(calibration, statistics)
    return calibration


def validation_views(model: BirdNet, split: RunSplit, tta: str) -> Views:
    """(pooled features, logits) of the validation images, then of their mirrors with ``tta`` flip."""
    return image_views(model, split.lr_images(split.val_rows), tta, "validation")


def image_views(model: BirdNet, images: np.ndarray, tta: str, name: str) -> Views:
    """(pooled features, logits) of ``images`` (uint8 N x 64 x 64 x 3), then of their mirrors with ``tta`` flip."""
    views = [pooled_outputs(model, images, f"calibrating: {name}")]
    if tta == "flip":
        views.append(pooled_outputs(model, images[:, :, ::-1].copy(), f"calibrating: mirrored {name}"))
    return views


def training_statistics(model: BirdNet, split: RunSplit, labels: list[str], score: str) -> dict:
    """What ``score`` needs from the pooled features of the training split (nothing for the logit scores)."""
    if score not in STATISTICS:
        return {}
    targets = torch.as_tensor(LabelMap(tuple(labels)).encode([split.table.labels[i] for i in split.train_rows]))
    features, _ = pooled_outputs(model, split.lr_images(split.train_rows), "calibrating: training")
    return feature_statistics(score, features, targets, len(labels))


def answers(head: CalibratedHead, views: Views) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated probabilities, unknown scores) of ``views`` through ``head``, averaged over the views (the TTA)."""
    parts = [head(features, logits) for features, logits in views]
    probs, unknown = (sum(part).numpy() / len(views) for part in zip(*parts))
    return probs, unknown


def views_temperature(views: Views, targets: np.ndarray) -> float:
    """The temperature of least NLL on these validation views (the mirrored one averaged in when there is one)."""
    return fit_temperature(views[0][1], torch.as_tensor(targets), views[1][1] if len(views) > 1 else None)


def held_out_fit(run: RunDir, data_dir: Path | None, tta: str, score: str, images: np.ndarray) -> tuple[float, float]:
    """``run``'s calibration fitted on its own held-out split with ``tta``'s answers, not saved: (its temperature, the
    share of ``images`` its unknown score keeps as known at the threshold that keeps ``KEEP_KNOWN`` of that split).
    For a run started from ``run`` whose validation ``images`` ``run`` trained on, that share says how much more
    familiar seen images look than unseen ones (0.95 for images ``run`` did not see, up to ~1 for seen ones)."""
    model, labels = load_run_model(run.path)
    split = run_split(run, data_dir)
    saved = run.calibration(SCORES, STATISTICS, len(labels), model.feature_width)
    with torch.no_grad():
        views = validation_views(model, split, tta)
        temperature = views_temperature(views, split.val_targets(labels))
        if saved is not None and saved[0]["score"] == score:  # its own calibrate stored them: no pass over training
            statistics = saved[1]
        else:
            statistics = training_statistics(model, split, labels, score)
        head = CalibratedHead(temperature, score, statistics)
        threshold = threshold_keeping(answers(head, views)[1], KEEP_KNOWN)
        kept = float((answers(head, image_views(model, images, tta, "its validation images"))[1] <= threshold).mean())
    return temperature, kept


def starting_runs_trained_on_validation(run: RunDir, split: RunSplit) -> list[RunDir]:
    """The runs ``run`` started from (``init_from``) when they trained on more than ``1 - HELD_OUT_SHARE`` of its
    validation images, else none: its temperature and the share its threshold keeps are then theirs, its own
    validation answers being those of a network that saw the images. Starting runs no longer found cannot be
    checked: said on stderr, none returned."""
    starts = [RunDir(path) for path in run.started_from()]
    if not starts:
        return []
    missing = [start for start in starts if not (start / RunDir.SPLIT).is_file()]
    if missing:
        print(
            f"note: {run.path} started from {missing[0].path}, which is not found: its temperature and threshold are "
            "fitted on its own validation split, which that run may have trained on",
            file=sys.stderr,
        )
        return []
    held_out = {split.table.ids[i] for i in split.val_rows}
    for start in starts:
        held_out &= set(start.split()["val_ids"])
    return starts if len(held_out) < HELD_OUT_SHARE * len(split.val_rows) else []


def calibrate(
    source: Path, data_dir: Path | None = None, score: str | None = None, tta: str | None = None
) -> list[tuple[Path, dict]]:
    """Calibrate a run folder, or every run of an ensemble or folds folder: (run, calibration.json) pairs; ``tta``
    (None: what an ensemble folder records, else none) is the TTA whose answers are fitted."""
    tta = tta or recorded_prediction([Path(source)])["tta"]
    return [(run, fit_run(run, data_dir, score, tta)) for run in model_folders(source)]


def describe(run: Path, calibration: dict) -> str:
    """One line: the temperature, ECE and NLL before/after on the validation split, the unknown score's threshold."""
    val, tta = calibration["validation"], calibration.get("tta", "none")
    starts = calibration.get("temperature_from")
    fitted, kept = "fitted", ""
    if starts:
        fitted = f"the mean of its starting runs', which trained on its validation images: {', '.join(starts)}"
        kept = ", the share its starting runs keep at their own thresholds"
    elif calibration.get("unfitted"):
        fitted = f"not fitted: {UNFITTED}"
    return (
        f"{run}: temperature {calibration['temperature']:.3f} ({fitted}, with {tta} TTA); validation ({val['images']} "
        "images) ECE "
        f"{val['ece_before']:.4f} -> {val['ece_after']:.4f}, NLL {val['nll_before']:.4f} -> {val['nll_after']:.4f}; "
        f"unknown: {calibration['score']} > {calibration['threshold']:.4g} (keeps {calibration['keep_known']:.1%} of "
        f"the validation images{kept})"
    )


def load_head(
    folder: Path, model: BirdNet, labels: list[str], remedy: str
) -> tuple[CalibratedHead, float | None, float]:
    """(the CalibratedHead of ``model``'s run folder or exported HF folder, its unknown threshold, the run's
    temperature: in an HF folder it is folded into the weights and the head's is 1); one written before calibration
    existed: temperature 1 and no threshold (no unknown flag), said once per folder on stderr with ``remedy``."""
    run = RunDir(folder)
    saved = run.calibration(SCORES, STATISTICS, len(labels), model.feature_width)
    if saved is None:
        if str(run.path) not in _TOLD_UNCALIBRATED:
            _TOLD_UNCALIBRATED.add(str(run.path))
            print(
                f"note: {run.path} has no {RunDir.CALIBRATION} (written before calibration existed, or its "
                f"calibration failed): its scores are uncalibrated and carry no unknown flag; {remedy}",
                file=sys.stderr,
            )
        return CalibratedHead(1.0, "max_softmax", {}), None, 1.0
    calibration, statistics = saved
    head = CalibratedHead(calibration["temperature"], calibration["score"], statistics)
    return head, calibration["threshold"], calibration.get("temperature_folded", calibration["temperature"])
