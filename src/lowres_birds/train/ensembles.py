"""Runs of runs: stratified k-fold (one run per fold) and ensemble recipes (one run, or its folds, per member),
each member trained by loop.py's ``train``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lowres_birds.config import RunConfig
from lowres_birds.errors import TrainingInterrupted
from lowres_birds.metrics import score
from lowres_birds.run_dir import FoldsDir, MembersDir, RunDir, replace_folder
from lowres_birds.train.loop import train
from lowres_birds.train.teacher import shared_teacher_key


def train_folds(cfg: RunConfig, data_dir: Path, out_dir: Path, force: bool = False) -> dict:
    """Stratified K-fold: one self-contained run per fold under OUT/fold<k>, then the out-of-fold macro-F1.

    The fold runs are averaged at test time with ``predict --run OUT`` (``--ensemble f1``: weighted by fold macro-F1).
    """
    out = FoldsDir(out_dir)
    replace_folder(out.path, force)
    folds = [
        train(dataclasses.replace(cfg, fold=k), data_dir, out.fold(k), force=force)["best_val_macro_f1"]
        for k in range(cfg.folds)
    ]
    predictions = [RunDir(out.fold(k)).val_predictions() for k in range(cfg.folds)]
    targets = np.concatenate([p["targets"] for p in predictions])
    predicted = np.concatenate([p["probs"].argmax(1) for p in predictions])
    summary = {
        "folds": cfg.folds,
        "fold_val_macro_f1": folds,
        **{f"oof_{k}": v for k, v in score(targets, predicted).items()},
    }
    out.write_summary(summary)
    return summary


def train_members(configs: dict[str, RunConfig], data_dir: Path, out_dir: Path, force: bool = False) -> dict:
    """An ensemble recipe: each member (one run, or its folds) trained into OUT/<name>, in recipe order.

    OUT/ensemble.json records the members' configs at the start and each member's validation macro-F1 as it
    finishes, so :func:`resume_members` continues an interrupted ensemble; ``predict --run OUT`` averages them.
    """
    out = MembersDir(out_dir)
    replace_folder(out.path, force)
    out.write_summary(
        {
            "data": str(Path(data_dir).resolve()),
            "members": {name: cfg.to_dict() for name, cfg in configs.items()},
            "val_macro_f1": {},
        }
    )
    return _train_missing_members(out, configs, data_dir, resume=False)


def resume_members(out_dir: Path, data_dir: Path | None = None) -> dict:
    """Continue an ensemble folder: finished members are kept, a stopped one resumed, the rest trained."""
    from lowres_birds.config import config_from_mapping

    out = MembersDir(out_dir)
    summary = out.summary()
    configs = {
        name: config_from_mapping(values, f"{out.path / MembersDir.SUMMARY}, member {name}")
        for name, values in summary["members"].items()
    }
    return _train_missing_members(out, configs, Path(data_dir or summary["data"]), resume=True)


def _train_missing_members(out: MembersDir, configs: dict[str, RunConfig], data_dir: Path, resume: bool) -> dict:
    """Members in recipe order; one whose fine-tuned teacher would repeat an earlier member's (same split, same
    teacher config) copies that teacher instead of training it again."""
    summary = out.summary()
    teachers: dict[str, Path] = {}
    for name, cfg in configs.items():
        folder = out.member(name)
        key = shared_teacher_key(cfg)
        if name not in summary["val_macro_f1"]:
            print(
                f"ensemble member {name} ({len(summary['val_macro_f1']) + 1} of {len(configs)}): {cfg.model} "
                f"({cfg.strategy})"
            )
            try:
                if cfg.folds and cfg.fold < 0:  # folds restart: a folds folder records no progress of its own
                    score = train_folds(cfg, data_dir, folder, force=True)["oof_macro_f1"]
                else:
                    stopped = resume and (
                        (folder / RunDir.CHECKPOINT).is_file()
                        or (folder / RunDir.TEACHER / RunDir.CHECKPOINT).is_file()
                    )
                    score = train(cfg, data_dir, folder, resume=stopped, force=True, shared_teacher=teachers.get(key))[
                        "best_val_macro_f1"
                    ]
            except TrainingInterrupted as exc:
                raise TrainingInterrupted(
                    f"{str(exc).partition('; continue with')[0]} of ensemble member {name}; "
                    f"continue with: lowres-birds train --resume {out.path}"
                ) from None
            summary["val_macro_f1"][name] = score
            out.write_summary(summary)
        if key is not None and (folder / RunDir.TEACHER / RunDir.TEACHER_TARGETS).is_file():
            teachers.setdefault(key, folder / RunDir.TEACHER)
    return summary
