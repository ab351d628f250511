"""Training, in the style of torchvision's classification references: ``train`` reads top to bottom (open the run,
its HR teacher, the session, the epochs), ``train_one_epoch`` is the step loop. Everything a run needs is built
by session.py, which also owns the run's state and its stop; accelerate runs it (CPU, GPU, mixed precision,
``accelerate launch``/``torchrun`` unchanged).

One checkpoint dict (model, optimiser, scheduler, EMA, loop state, RNG states) makes ``--resume`` continue
exactly where a run stopped; SIGINT/SIGTERM save it at the next step and stop.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lowres_birds.config import RunConfig
from lowres_birds.errors import TrainingInterrupted, UserError
from lowres_birds.progress import bar
from lowres_birds.run_dir import RunDir
from lowres_birds.train.data import TeacherTargets, training_batch, uses_teacher
from lowres_birds.train.losses import total_loss
from lowres_birds.train.session import OpenedRun, RunSession, open_run
from lowres_birds.train.teacher import (
    distilled_teacher,
    finetuned_teacher_targets,
    frozen_teacher,
    saved_teacher,
    teacher_config,
    teacher_finished,
    trains_teacher,
)


def train(
    cfg: RunConfig,
    data_dir: Path,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    shared_teacher: Path | None = None,
    refuse_finished: bool = False,
) -> dict:
    """Train one run (or continue it: ``resume``), returning the kept weights' validation metrics; ``shared_teacher``: a
    finished fine-tuned teacher folder of the same ``shared_teacher_key`` (an earlier ensemble member's) to copy.
    A resumed run that had finished training is closed again (an ensemble or study stopped after it finished), or
    with ``refuse_finished`` (the user's ``--resume``) refused in one line."""
    opened = open_run(cfg, data_dir, run_dir, resume=resume, force=force)
    session = RunSession.create(opened, hr_teacher(opened, shared_teacher))
    if resume and refuse_finished and session.finished:
        weights = (
            "its weights are kept"
            if (session.run / RunDir.WEIGHTS).is_file()
            else f"but its {RunDir.WEIGHTS} is missing: train it again with --force, without --resume"
        )
        done = f"{session.state.epoch} of {session.epochs} epochs"
        raise UserError(f"{session.run} finished training ({done}), {weights}; nothing to resume")
    session.start()
    with session.signals:
        while not session.finished:
            train_one_epoch(session, session.epoch_loader())
            session.end_epoch()
    if session.cfg.recompute_batchnorm:
        session.recompute_batchnorm()
    return session.close()


def hr_teacher(opened: OpenedRun, shared: Path | None = None) -> TeacherTargets | None:
    """The run's HR teacher (None: the recipe distils nothing). A fine-tuned one is a run of its own in RUN/teacher,
    trained here by :func:`train` first (or resumed, read back, or copied from ``shared``)."""
    cfg, data, run = opened.cfg, opened.data, opened.run
    if not uses_teacher(cfg):
        return None
    if cfg.distill_from:
        return distilled_teacher(cfg, data, run)
    if not trains_teacher(cfg):
        return frozen_teacher(cfg, data)
    targets = saved_teacher(cfg, data, run, shared)
    if targets is not None:
        return targets
    started, folder = time.perf_counter(), run / RunDir.TEACHER
    if not teacher_finished(folder, cfg.teacher_epochs):
        try:
            train(teacher_config(cfg), opened.data_dir, folder, resume=RunDir(folder).has_checkpoint(), force=True)
        except TrainingInterrupted as exc:
            stopped = str(exc).partition(";")[0]
            raise TrainingInterrupted(
                f"{stopped} of the HR teacher in {folder}; continue with: lowres-birds train --resume {run}"
            ) from None
    return finetuned_teacher_targets(cfg, data, run, time.perf_counter() - started)


def train_one_epoch(session: RunSession, loader: torch.utils.data.DataLoader) -> None:
    """One pass over ``loader``'s batches, up to the epoch's end or a stop decided at a validation within it."""
    cfg, parts, state, meter = session.cfg, session.parts, session.state, session.meter
    model, accelerator = parts.model, parts.accelerator
    num_classes = accelerator.unwrap_model(model).spec.num_classes
    feature_kd = parts.hr.teacher is not None and cfg.feature_kd_weight > 0
    model.train()
    done = state.step_in_epoch * cfg.grad_accum
    steps = bar(
        loader,
        desc=f"epoch {state.epoch + 1}/{session.epochs}",
        initial=done,
        total=len(loader) + done,
        unit="batch",
        show=accelerator.is_local_main_process,
    )
    for images, labels, indices in steps:
        with accelerator.accumulate(model):
            images, targets = training_batch(images, labels, indices, num_classes, cfg, parts.generator, parts.hr)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            features, logits = model(images, return_features=True) if feature_kd else (None, model(images))
            loss = total_loss(logits, features, targets, cfg, parts.class_weights)
            if not torch.isfinite(loss):
                kept = (
                    "the last checkpoint is kept; resume with --resume"
                    if session.checkpointer.exists()
                    else "no checkpoint was written yet"
                )
                raise UserError(
                    f"loss became {loss.item()} at epoch {state.epoch + 1}; lower --lr or use --mixed-precision no "
                    f"({kept})"
                )
            accelerator.backward(loss)
            parts.optimizer.step()
            parts.scheduler.step()
            parts.optimizer.zero_grad(set_to_none=True)
        meter.update(loss.item(), len(labels))
        steps.set_postfix(meter.postfix())
        if accelerator.sync_gradients:
            session.after_step()
            if session.finished:
                break
    steps.close()
