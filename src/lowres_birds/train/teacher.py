"""The HR teacher: what the 256x256 twins can teach a 64x64 student (the test set has no twins).

Both kinds (``teacher``) give, for every training row, logits and pooled features on its HR twin at
``teacher_size``: the distillation targets of losses.py.

- ``frozen``: the pretrained backbone, frozen, with a logistic-regression head fitted on the training split. The
  features are cached beside the decoded images, so ablations and folds compute them once.
- ``finetuned``: a regular run at RUN/teacher, trained first on the HR twins (by loop.py's ``train``, with
  :func:`teacher_config`) on the student's split, so the student's validation rows stay unseen. Its best weights'
  outputs are written once into that folder; a resumed student reads them back, or resumes an unfinished teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from lowres_birds.config import STUDENT_ONLY, RunConfig
from lowres_birds.data.images import cache_dir
from lowres_birds.errors import UserError
from lowres_birds.metrics import score
from lowres_birds.model.ensemble import ensemble_probabilities, mean_probabilities, member_models, member_runs
from lowres_birds.model.factory import create_model, load_run_model
from lowres_birds.model.wrapper import BirdNet, in_batches, pooled_outputs
from lowres_birds.run_dir import RunDir, model_folders, save_torch
from lowres_birds.train.data import TeacherTargets, TrainingData, uses_teacher
from lowres_birds.train.degradation import array_fingerprint


def teacher_source(cfg: RunConfig) -> str:
    return cfg.teacher_model or cfg.model


def trains_teacher(cfg: RunConfig) -> bool:
    """The run fine-tunes a teacher of its own on the HR twins (RUN/teacher) before the student."""
    return uses_teacher(cfg) and cfg.teacher == "finetuned" and not cfg.distill_from


def without_unusable_start(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """(the config, a one-line notice or None): ``student_from_teacher`` (set by the ``cpu`` recipe) needs a fine-tuned
    teacher of the student's own model; a run without one (--kd-weight 0, --teacher frozen, another --teacher-model)
    starts from the pretrained weights instead, and says so, rather than failing."""
    if not cfg.student_from_teacher or (trains_teacher(cfg) and teacher_source(cfg) == cfg.model):
        return cfg, None
    notice = (
        f"student_from_teacher: this run has no fine-tuned teacher of {cfg.model} (teacher {cfg.teacher}, model "
        f"{teacher_source(cfg)}, kd weights {cfg.kd_weight:g}/{cfg.feature_kd_weight:g}): the student starts from "
        f"{'pretrained' if cfg.pretrained else 'random'} weights"
    )
    return dataclasses.replace(cfg, student_from_teacher=False), notice


def check_teacher(cfg: RunConfig, student: BirdNet, labels: list[str]) -> None:
    """Refuse, before any training, a teacher without pooled features or whose features the student cannot match."""
    if not uses_teacher(cfg):
        return
    if cfg.distill_from:
        member_runs(Path(cfg.distill_from))  # every run it stands for is a trained run folder
        return
    source = teacher_source(cfg)
    teacher = student if source == cfg.model else create_model(source, labels, cfg.teacher_size, pretrained=False)
    if teacher.feature_width is None:
        raise UserError(
            f"the HR teacher needs pooled features, which {source} does not give (a timm backbone does); "
            "set --teacher-model to a timm or efficientnet_lite model, or --kd-weight 0 --feature-kd-weight 0"
        )
    if cfg.feature_kd_weight > 0 and teacher.feature_width != student.feature_width:
        raise UserError(
            f"--feature-kd-weight {cfg.feature_kd_weight:g} needs equal feature widths, but the teacher {source} has "
            f"{teacher.feature_width} and the student {cfg.model} {student.feature_width}; set --feature-kd-weight 0 "
            "or use the same model"
        )


# --------------------------------------------------------------------------- frozen


def hr_features(
    source: str, labels: list[str], hr_images: np.ndarray, input_size: int, pretrained: bool = True
) -> torch.Tensor:
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
    from accelerate import PartialState

    device = PartialState().device  # the GPU when training has one: EVA-02 large over 15k HR twins is hours on a CPU
    model = create_model(source, labels, input_size, pretrained=pretrained).eval().to(device)
    features = torch.from_numpy(
        in_batches(lambda batch: model(batch.to(device), return_features=True)[0], hr_images, desc="teacher features")
    )
    save_torch(cache, features)
    return features


def frozen_teacher(cfg: RunConfig, data: TrainingData) -> TeacherTargets:
    """Frozen pretrained backbone on HR at ``teacher_size`` + logistic regression fitted on the training split."""
    from sklearn.linear_model import LogisticRegression

    started, source, labels = time.perf_counter(), teacher_source(cfg), list(data.label_map.classes)
    features = hr_features(source, labels, data.hr_images, cfg.teacher_size, cfg.pretrained)
    head = LogisticRegression(C=0.5, max_iter=300)
    head.fit(features[data.train_idx].numpy(), data.targets[data.train_idx])
    logits = torch.zeros(len(features), len(labels))
    logits[:, head.classes_] = torch.from_numpy(head.decision_function(features.numpy())).float()
    return TeacherTargets(
        features,
        logits,
        _hr_val_f1(data, logits),
        "frozen",
        f"{source} frozen at {cfg.teacher_size}, logistic head",
        time.perf_counter() - started,
    )


def _hr_val_f1(data: TrainingData, logits: torch.Tensor) -> float:
    return score(data.targets[data.val_idx], logits[data.val_idx].argmax(1).numpy())["macro_f1"]


# --------------------------------------------------------------------------- fine-tuned


def teacher_config(cfg: RunConfig) -> RunConfig:
    """The teacher run's config: the student's model (or ``teacher_model``), seed, split and optimiser, trained on
    the HR twins resized to ``teacher_size`` for ``teacher_epochs`` (fewer if its share of the budget says so: more
    data means fewer teacher epochs, not a student left with no time; the student plans in what the teacher left)."""
    plain = {spec.name: spec.default for spec in STUDENT_ONLY}
    return dataclasses.replace(
        cfg,
        **plain,
        model=teacher_source(cfg),
        strategy=f"hr-downscale:{cfg.teacher_size}",
        epochs=cfg.teacher_epochs,
        budget_minutes=cfg.budget_minutes * cfg.teacher_budget_share,
    ).validate()


def shared_teacher_key(cfg: RunConfig) -> str | None:
    """Runs whose fine-tuned teachers would be the same run but for the teacher's seed and budget: the teacher's
    config (its split seed made explicit) with those two blanked. None: no fine-tuned teacher, or folds (a teacher
    per fold)."""
    if not trains_teacher(cfg) or cfg.folds:
        return None
    return dataclasses.replace(teacher_config(cfg), split_seed=cfg.split_seed_used, seed=0, budget_minutes=0).to_yaml()


def saved_teacher(cfg: RunConfig, data: TrainingData, run: RunDir, shared: Path | None) -> TeacherTargets | None:
    """The fine-tuned teacher's targets without training: copied from the finished teacher folder ``shared`` (an
    earlier ensemble member's, of the same :func:`shared_teacher_key`) or read back from RUN/teacher; None when
    the teacher still has to train. Every process of a distributed run calls this."""
    from accelerate import PartialState

    processes = PartialState()
    folder = RunDir(run / RunDir.TEACHER)
    rows, classes = len(data.targets), len(data.label_map.classes)
    if shared is not None and not folder.path.exists():
        if processes.is_main_process:
            folder.copy_from(shared)
        processes.wait_for_everyone()
        saved = folder.teacher_targets(
            rows, classes, damaged=f"the teacher copied from {shared} is damaged: remove both and resume"
        )
        return _targets(cfg, folder, saved, reused=True, shared_from=shared)
    saved = None
    if (folder / RunDir.TEACHER_TARGETS).is_file():
        try:
            saved = folder.teacher_targets(rows, classes, damaged="computing them again")
        except UserError as exc:
            processes.print(str(exc))
    processes.wait_for_everyone()  # every process has read the file before the main one may replace it
    return None if saved is None else _targets(cfg, folder, saved, reused=True)


def finetuned_teacher_targets(cfg: RunConfig, data: TrainingData, run: RunDir, seconds: float) -> TeacherTargets:
    """The trained RUN/teacher's targets: computed and written by the main process (``seconds``: what training the
    teacher took), read back by every process."""
    from accelerate import PartialState

    processes = PartialState()
    folder = RunDir(run / RunDir.TEACHER)
    started = time.perf_counter()
    if processes.is_main_process:
        model, _ = load_run_model(folder.path, str(processes.device))
        features, logits = pooled_outputs(model, data.hr_images, "teacher targets", processes.device)
        seconds += time.perf_counter() - started
        folder.save_teacher_targets(features, logits, _hr_val_f1(data, logits), seconds)
    processes.wait_for_everyone()
    damaged = "the teacher's folder is damaged: remove it and resume"
    saved = folder.teacher_targets(len(data.targets), len(data.label_map.classes), damaged=damaged)
    return _targets(cfg, folder, saved)


def _targets(cfg: RunConfig, folder: RunDir, saved: dict, **origin) -> TeacherTargets:
    description = (
        f"{teacher_source(cfg)} fine-tuned on the HR twins at {cfg.teacher_size} (at most {cfg.teacher_epochs} "
        f"epochs), {folder}"
    )
    if origin.get("shared_from") is not None:
        description += f", shared with {origin['shared_from']}"
    return TeacherTargets(
        saved["features"], saved["logits"], saved["val_macro_f1"], "finetuned", description, saved["seconds"], **origin
    )


def teacher_finished(folder: Path, epochs: int) -> bool:
    """The teacher run at ``folder`` trained all its ``epochs`` and kept its best weights."""
    run = RunDir(folder)
    records = run.metrics(missing_ok=True) if run.path.is_dir() else []
    return bool(records) and records[-1]["epoch"] >= epochs and (run / RunDir.WEIGHTS).is_file()


# --------------------------------------------------------------------------- distilled models


def distilled_teacher(cfg: RunConfig, data: TrainingData, run: RunDir) -> TeacherTargets:
    """The models of ``distill_from`` as the teacher, weighted by validation macro-F1. ``distill_targets`` cached:
    their mean probabilities with flip TTA on every training row's LR image (--distill-images' photos included),
    computed once by the main process into RUN/distill_targets (a resumed run reads them back; a damaged file is
    refused), stored as log-probabilities (the loss softens them by kd_temperature). online: the models themselves,
    answering each augmented batch (nothing cached; each process loads them)."""
    from accelerate import PartialState

    processes = PartialState()
    source, labels = Path(cfg.distill_from), list(data.label_map.classes)
    runs = len(model_folders(source))
    how = "online on every augmented batch" if cfg.distill_targets == "online" else "flip TTA"
    description = f"{source} ({runs} run{'s' * (runs > 1)}, {how}, weighted by validation macro-F1)"
    if cfg.distill_targets == "online":
        started = time.perf_counter()
        members, weights = member_runs(source)
        models = member_models(members, labels, str(processes.device))

        def answer(batch: torch.Tensor) -> torch.Tensor:
            return mean_probabilities(models, weights, batch.to(processes.device), flip=False)

        val_f1 = score(data.targets[data.val_idx], in_batches(answer, data.lr_images[data.val_idx]).argmax(1))
        if len(data.unlabelled_idx):
            label_unlabelled(data, torch.from_numpy(in_batches(answer, data.lr_images[data.unlabelled_idx])))
        seconds = time.perf_counter() - started
        return TeacherTargets(None, None, val_f1["macro_f1"], "distilled", description, seconds, answer=answer)
    rows, classes, path = len(data.targets), len(labels), run / RunDir.DISTILL_TARGETS
    reused = path.is_file()
    if not reused and processes.is_main_process:
        started = time.perf_counter()
        members, weights = member_runs(source)
        probs = ensemble_probabilities(members, weights, data.lr_images, labels, str(processes.device))
        logits = torch.from_numpy(np.log(np.clip(probs, 1e-8, None)))
        run.save_teacher_targets(
            None, logits, _hr_val_f1(data, logits), time.perf_counter() - started, name=RunDir.DISTILL_TARGETS
        )
    processes.wait_for_everyone()
    damaged = "remove it and resume (it is computed again)"
    saved = run.teacher_targets(rows, classes, damaged, name=RunDir.DISTILL_TARGETS, with_features=False)
    label_unlabelled(data, saved["logits"][data.unlabelled_idx])
    return TeacherTargets(
        None,
        saved["logits"],
        saved["val_macro_f1"],
        "distilled",
        f"{description}, {path}",
        saved["seconds"],
        reused=reused,
    )


def label_unlabelled(data: TrainingData, scores: torch.Tensor) -> None:
    """--distill-images' rows take the distilled models' top class (``scores``: theirs, one row per photo) as their
    label: the cross-entropy then pulls the way the soft targets do (pseudo-labels, Lee 2013)."""
    data.targets[data.unlabelled_idx] = scores.argmax(1).numpy()


def start_from_teacher(student: BirdNet, run: RunDir) -> None:
    """Load the fine-tuned teacher's best weights into the student (``student_from_teacher``): it already knows the
    species from the sharp twins and starts closer to a good low-res model than ImageNet's weights."""
    start_from(
        student,
        run / RunDir.TEACHER,
        "a model whose weights depend on its input size needs --teacher-size equal to the student's, or drop "
        "--student-from-teacher",
    )


def start_from_runs(student: BirdNet, folders: list[Path], labels: list[str]) -> None:
    """``init_from``: other trained runs' kept weights as the start, refused in one line when a folder has none or
    was trained on other classes than ``labels``. Several runs start the student from the mean of their weights, a
    uniform model soup (Wortsman et al. 2022): runs of one model fine-tuned from one start (cpu-best's two lite0
    members) lie near one basin, so their mean is a working network; whether it beats each run depends on the pair
    (0.901 test macro-F1 against 0.887 and 0.893 for cpu-best's; 0.881 against 0.893 and 0.893 for another)."""
    runs = [RunDir(folder) for folder in folders]
    for run in runs:
        if not (run / RunDir.WEIGHTS).is_file():
            raise UserError(
                f"init_from {run}: no {RunDir.WEIGHTS} there; pass a run folder written by lowres-birds train"
            )
        if run.labels() != labels:
            raise UserError(f"init_from {run} was trained on other classes than this data's: start from one of them")
    weights = [run.weights() for run in runs]
    for run, other in zip(runs[1:], weights[1:]):
        if other.keys() != weights[0].keys() or any(other[k].shape != v.shape for k, v in weights[0].items()):
            raise UserError(
                f"init_from: {run} holds another model than {runs[0]}; average runs of one model and input size only"
            )
    soup = {
        name: torch.stack([w[name].float() for w in weights]).mean(0).to(tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in weights[0].items()
    }
    source = ", ".join(str(run / RunDir.WEIGHTS) for run in runs)
    load_start(student, soup, source, "init_from needs runs of the same model and input size")


def start_from(student: BirdNet, folder: Path, remedy: str) -> None:
    """Load a trained run folder's kept weights into the student (refused in one line naming the file when they do
    not fit)."""
    run = RunDir(folder).require()
    load_start(student, run.weights(), str(run / RunDir.WEIGHTS), remedy)


def load_start(student: BirdNet, weights: dict[str, torch.Tensor], source: str, remedy: str) -> None:
    """Start weights into the student, refused in one line naming where they came from when they do not fit."""
    try:
        student.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(
            f"the weights in {source} do not fit the student ({str(exc).splitlines()[0][:120]}): {remedy}"
        ) from None
