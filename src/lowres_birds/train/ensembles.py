"""Runs of runs: stratified k-fold (one run per fold) and ensemble recipes (one run, or its folds, per member),
each member trained by loop.py's ``train``."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lowres_birds.config import EnsembleRecipe, RunConfig, config_from_mapping
from lowres_birds.data.splits import check_folds
from lowres_birds.data.tables import LabelMap, load_train_table
from lowres_birds.errors import TrainingInterrupted
from lowres_birds.metrics import score
from lowres_birds.model.factory import require_model_available
from lowres_birds.run_dir import FoldsDir, MembersDir, RunDir, replace_folder
from lowres_birds.train.data import uses_teacher
from lowres_birds.train.loop import train
from lowres_birds.train.teacher import shared_teacher_key, teacher_source


def train_folds(cfg: RunConfig, data_dir: Path, out_dir: Path, force: bool = False) -> dict:
    """Stratified K-fold: one self-contained run per fold under OUT/fold<k>, then the out-of-fold macro-F1.

    The fold runs are averaged at test time with ``predict --run OUT`` (``--ensemble f1``: weighted by fold macro-F1).
    """
    require_models_available([cfg])
    return _train_folds(cfg, data_dir, out_dir, force)


def _train_folds(cfg: RunConfig, data_dir: Path, out_dir: Path, force: bool) -> dict:
    """``train_folds`` once its model is known to be available."""
    out = FoldsDir(out_dir)
    table = load_train_table(data_dir)
    check_folds(np.asarray(LabelMap.fit(table.labels).encode(table.labels)), cfg.folds)  # before the folder is made
    replace_folder(out.path, force, group=True)
    folds = [
        train(dataclasses.replace(cfg, fold=k), data_dir, out.fold(k), force=force)["val_macro_f1"]
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


def train_members(recipe: EnsembleRecipe, data_dir: Path, out_dir: Path, force: bool = False) -> dict:
    """An ensemble recipe: each member (one run, or its folds) trained into OUT/<name>, in recipe order, then its
    student (if any) into OUT/student, distilled from the members (``distill_from`` OUT; relative ``init_from`` runs
    are inside OUT).

    OUT/ensemble.json records the configs at the start, how the ensemble predicts, and each validation macro-F1 as
    its run finishes, so :func:`resume_members` continues an interrupted ensemble; ``predict --run OUT`` averages the
    members.
    """
    out = MembersDir(out_dir)
    student = None
    if recipe.student is not None:
        start = ",".join(str((out.path / run).resolve()) for run in recipe.student.init_runs)
        student = dataclasses.replace(recipe.student, distill_from=str(out.path.resolve()), init_from=start)
    require_models_available([*recipe.members.values(), *([student] if student else [])])
    if student is not None:
        student.validate()
    replace_folder(out.path, force, group=True)
    summary = {
        "data": str(Path(data_dir).resolve()),
        "members": {name: cfg.to_dict() for name, cfg in recipe.members.items()},
        "val_macro_f1": {},
        "ensemble": recipe.ensemble,
        "tta": recipe.tta,
        **({"student": student.to_dict()} if student else {}),
    }
    out.write_summary(summary)
    return _train_missing(out, recipe.members, student, data_dir, resume=False)


def resume_members(out_dir: Path, data_dir: Path | None = None) -> dict:
    """Continue an ensemble folder: finished members are kept, a stopped one resumed, the rest (then the student)
    trained; a recorded run whose weights are gone is trained again."""
    out = MembersDir(out_dir)
    summary = out.summary()
    configs, student = saved_configs(out)
    recorded = {name: out.member(name) for name in summary["val_macro_f1"]}
    if "student_val_macro_f1" in summary:
        recorded["student"] = out.student
    lost = [name for name, folder in recorded.items() if not _has_weights(folder)]
    for name in lost:
        print(f"{recorded[name]} has no {RunDir.WEIGHTS}: trained again")
        if name == "student":
            del summary["student_val_macro_f1"]
        else:
            del summary["val_macro_f1"][name]
    if lost:
        out.write_summary(summary)
    if "student_val_macro_f1" in summary:
        student = None
    pending = [cfg for name, cfg in configs.items() if name not in summary["val_macro_f1"]]
    require_models_available([*pending, *([student] if student else [])])
    return _train_missing(out, configs, student, Path(data_dir or summary["data"]), resume=True, afresh=set(lost))


def _has_weights(folder: Path) -> bool:
    """A run folder with its kept weights, or a folds folder whose every fold has them."""
    folds = FoldsDir(folder)
    runs = [folds.fold(k) for k in range(folds.summary()["folds"])] if folds.is_group() else [folder]
    return all((Path(run) / RunDir.WEIGHTS).is_file() for run in runs)


def saved_configs(out: MembersDir) -> tuple[dict[str, RunConfig], RunConfig | None]:
    """The members' configs and the student's (None: the recipe has none) as the folder's ensemble.json saved them."""
    summary = out.summary()
    configs = {
        name: config_from_mapping(values, f"{out.path / MembersDir.SUMMARY}, member {name}")
        for name, values in summary["members"].items()
    }
    student = summary.get("student")
    if student is None:
        return configs, None
    return configs, config_from_mapping(student, f"{out.path / MembersDir.SUMMARY}, student")


def require_models_available(configs: list[RunConfig]) -> None:
    """Each run's model (and its teacher's) checked by ``require_model_available``, once per model, before anything
    is written or trained."""
    sources = {
        (source, cfg.pretrained)
        for cfg in configs
        for source in (cfg.model, teacher_source(cfg) if uses_teacher(cfg) and not cfg.distill_from else cfg.model)
    }
    for source, pretrained in sorted(sources):
        require_model_available(source, pretrained)


def _train_missing(
    out: MembersDir,
    configs: dict[str, RunConfig],
    student: RunConfig | None,
    data_dir: Path,
    resume: bool,
    afresh: set[str] | None = None,
) -> dict:
    """Members in recipe order not yet trained, then ``student`` (None: none, or already trained); a member whose
    fine-tuned teacher would repeat an earlier member's (same split, same teacher config) copies that teacher instead
    of training it again; the runs named in ``afresh`` (their weights lost) start over instead of resuming. The
    callers checked that every model is available."""
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
            with _named_stop(f"ensemble member {name}", out):
                if cfg.folds and cfg.fold < 0:  # folds restart: a folds folder records no progress of its own
                    score = _train_folds(cfg, data_dir, folder, force=True)["oof_macro_f1"]
                else:
                    stopped = resume and name not in (afresh or set()) and RunDir(folder).resumable()
                    score = train(cfg, data_dir, folder, resume=stopped, force=True, shared_teacher=teachers.get(key))[
                        "val_macro_f1"
                    ]
            summary["val_macro_f1"][name] = score
            out.write_summary(summary)
        if key is not None and (folder / RunDir.TEACHER / RunDir.TEACHER_TARGETS).is_file():
            teachers.setdefault(key, folder / RunDir.TEACHER)
    if student is not None:
        print(
            f"the ensemble's student, distilled from its {len(configs)} members: {student.model} ({student.strategy})"
        )
        # stopped after its soft targets were written (or later): they are read back, not computed again
        stopped = (
            resume
            and "student" not in (afresh or set())
            and any((out.student / name).is_file() for name in (RunDir.CHECKPOINT, RunDir.DISTILL_TARGETS))
        )
        with _named_stop("the ensemble's student", out):
            summary["student_val_macro_f1"] = train(student, data_dir, out.student, resume=stopped, force=True)[
                "val_macro_f1"
            ]
        out.write_summary(summary)
    return summary


@contextlib.contextmanager
def _named_stop(what: str, out: MembersDir) -> Iterator[None]:
    """An interrupted member or student says which one stopped and how to continue the whole ensemble."""
    try:
        yield
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(
            f"{str(exc).partition('; continue with')[0]} of {what}; continue with: lowres-birds train --resume "
            f"{out.path}"
        ) from None
