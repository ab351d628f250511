"""Training: ``train_one_epoch`` / ``train`` in the style of torchvision's classification references (validation,
every ``val_every`` of an epoch, in train/validation.py), run through accelerate (CPU, GPU, mixed precision,
``accelerate launch``/``torchrun`` unchanged).

One checkpoint dict (model, optimiser, scheduler, EMA, loop state, RNG states) makes ``--resume`` continue
exactly where a run stopped; SIGINT/SIGTERM save it at the next step and stop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from lowres_birds.config import RunConfig, parse_strategy
from lowres_birds.errors import TrainingInterrupted, UserError
from lowres_birds.metrics import score
from lowres_birds.model.factory import create_model, save_architecture
from lowres_birds.run_dir import FoldsDir, MembersDir, RunDir, replace_folder
from lowres_birds.train.batches import make_loader
from lowres_birds.train.budget import BudgetPlanner
from lowres_birds.train.data import (
    HRSupport,
    TrainingData,
    hr_support,
    load_training_data,
    training_batch,
    without_missing_twins,
)
from lowres_birds.train.losses import class_balanced_weights, total_loss
from lowres_birds.train.optim import (
    check_tracker,
    create_accelerator,
    create_optimizer,
    create_scheduler,
    start_processes,
)
from lowres_birds.train.state import Checkpointer, StopFlag, Trainee, TrainState
from lowres_birds.train.teacher import (
    check_teacher,
    hr_teacher,
    shared_teacher_key,
    start_from_teacher,
    without_unusable_start,
)
from lowres_birds.train.validation import TrainingMeter, Validator


def train_one_epoch(
    parts: Trainee,
    loader,
    cfg: RunConfig,
    state: TrainState,
    checkpointer: Checkpointer,
    stop: StopFlag,
    validator: Validator | None,
) -> dict:
    """One pass over the training batches, validating when ``validator`` says so (None: never), up to the epoch's
    end or an early stop; returns the mean loss and images/s since the last validation."""
    from tqdm.auto import tqdm

    model, accelerator = parts.model, parts.accelerator
    num_classes = accelerator.unwrap_model(model).spec.num_classes
    feature_kd = parts.hr.teacher is not None and cfg.feature_kd_weight > 0
    model.train()
    meter = TrainingMeter()
    done = state.step_in_epoch * cfg.grad_accum
    bar = tqdm(
        loader,
        desc=f"epoch {state.epoch + 1}/{state.epochs(cfg)}",
        initial=done,
        total=len(loader) + done,
        disable=not accelerator.is_local_main_process,
        leave=False,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    for images, labels, indices in bar:
        with accelerator.accumulate(model):
            images, targets = training_batch(images, labels, indices, num_classes, cfg, parts.generator, parts.hr)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            features, logits = model(images, return_features=True) if feature_kd else (None, model(images))
            loss = total_loss(logits, features, targets, cfg, parts.class_weights)
            if not torch.isfinite(loss):
                kept = (
                    "the last checkpoint is kept; resume with --resume"
                    if checkpointer.exists()
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
        bar.set_postfix(meter.postfix())
        if not accelerator.sync_gradients:
            continue
        if parts.ema is not None:
            parts.ema.update(accelerator.unwrap_model(model), step=state.global_step)
        state.step_in_epoch += 1
        state.global_step += 1
        if parts.planner is not None:
            parts.planner.after_step(state)
        if validator is not None and validator.due(state):
            validator.validate(state, meter.stats(accelerator))  # saves the checkpoint too
            meter.reset()
        elif stop.signal_name or (cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0):
            checkpointer.save(state)
        if stop.signal_name:
            raise TrainingInterrupted(
                f"{stop.signal_name}: checkpoint saved at epoch {state.epoch + 1}, step {state.step_in_epoch}; "
                f"continue with: lowres-birds train --resume {checkpointer.run}"
            )
        if validator is not None and validator.stopped:
            break
    bar.close()
    return meter.stats(accelerator)


def _check_resume(run: RunDir, data: TrainingData) -> None:
    """Refuse to resume on other data (the label set, the data fingerprint and the validation ids must be those of
    the run) or with a damaged metrics.jsonl (read now, not after the next epoch)."""
    labels, split = run.labels(), run.split()
    run.metrics(missing_ok=True)
    if labels != list(data.label_map.classes):
        raise UserError(
            f"{run / RunDir.LABELS} lists other classes than the data ({len(labels)} vs "
            f"{len(data.label_map.classes)}); "
            "resume on the data the run was trained on, or start a new run"
        )
    if split.get("fingerprint") not in (None, data.table.fingerprint()):
        raise UserError(
            f"the data in {data.table.root} changed since {run} was trained ({RunDir.SPLIT} records other ids, files "
            "or labels); "
            "resume on the data the run was trained on, or start a new run"
        )
    if split["val_ids"] != [data.table.ids[i] for i in data.val_idx]:
        raise UserError(
            f"{run / RunDir.SPLIT} records another validation split than the run's config draws from this data; "
            "resume on the data the run was trained on, or start a new run"
        )


def train(
    cfg: RunConfig,
    data_dir: Path,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    shared_teacher: Path | None = None,
) -> dict:
    """Train one run (or continue it: ``resume``), returning the best validation metrics; ``shared_teacher``: a
    finished fine-tuned teacher folder of the same :func:`shared_teacher_key` (an earlier ensemble member's) to copy."""
    from accelerate.utils import set_seed

    if cfg.folds and cfg.fold < 0:
        raise UserError("a k-fold config trains one fold per run: set --fold K, or let `train --folds K` run them all")
    check_tracker(cfg)  # before the data, and before a fine-tuned teacher trains
    run = RunDir(run_dir)
    data = load_training_data(data_dir, cfg)
    cfg, notice = without_missing_twins(cfg, data)
    cfg, start_notice = without_unusable_start(cfg)
    labels = list(data.label_map.classes)
    if resume:
        _check_resume(run, data)
    processes = start_processes(cfg)
    for line in (notice, start_notice):
        if line:
            processes.print(line)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    model = create_model(
        cfg.model,
        labels,
        parse_strategy(cfg.strategy).input_size,
        pretrained=cfg.pretrained,
        upscale_filter=cfg.upscale_filter,
    )
    model.freeze_early_layers(cfg.freeze_blocks)
    check_teacher(cfg, model, labels)
    if cfg.grad_checkpointing:
        model.enable_grad_checkpointing()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not resume:  # the old run is replaced only now that data and model are known good, once every process checked it
        replace_folder(run.path, force, create=False)
        processes.wait_for_everyone()
    if processes.is_main_process and not resume:
        replace_folder(run.path, force)
        run.write_config(cfg)
        run.write_labels(labels)
        save_architecture(model, run)
        run.write_split(data_dir, [data.table.ids[i] for i in data.val_idx], data.table.fingerprint())
    processes.wait_for_everyone()
    hr = hr_support(
        cfg, data, hr_teacher(cfg, data, run, data_dir, train, shared_teacher)
    )  # a fine-tuned teacher trains here, in RUN/teacher
    if cfg.student_from_teacher:  # a resumed run's checkpoint replaces these weights below
        start_from_teacher(model, run)
    accelerator = create_accelerator(cfg, run.path)  # after the teacher's: one Accelerator at a time
    if hr.degradation is not None and accelerator.is_main_process:
        hr.degradation.save(run / RunDir.DEGRADATION, **hr.degradation_report)
    optimizer = create_optimizer(model, cfg)
    loader = make_loader(data.train_images, data.targets, data.train_idx, cfg.batch_size, cfg.seed, shuffle=True)
    # accelerate steps a prepared scheduler num_processes times per optimizer step: count in those units.
    steps_per_epoch = accelerator.num_processes * math.ceil(
        math.ceil(len(loader) / accelerator.num_processes) / cfg.grad_accum
    )
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema_decay)
    parts = Trainee(
        model,
        optimizer,
        scheduler,
        accelerator,
        torch.Generator().manual_seed(cfg.seed + accelerator.process_index),
        ema,
        hr,
    )
    if cfg.class_balanced_beta > 0:
        counts = np.bincount(data.targets[data.train_idx], minlength=len(labels))
        parts.class_weights = class_balanced_weights(counts, cfg.class_balanced_beta).to(accelerator.device)
    checkpointer = Checkpointer(run, parts)
    state = (
        checkpointer.restore() if resume and checkpointer.exists() else TrainState()
    )  # none yet: stopped in the teacher
    _print_header(accelerator, cfg, data, hr, run, state)
    if cfg.log != "none":
        accelerator.init_trackers("lowres-birds", config=cfg.to_dict())
    if (
        not state.global_step
        and hr.teacher is not None
        and hr.teacher.kind == "finetuned"
        and hr.teacher.shared_from is None
    ):
        state.elapsed_s = hr.teacher.seconds  # the run's clock, and so its time budget, includes its teacher's training
    clock_start = time.perf_counter() - state.elapsed_s
    validator = Validator(
        cfg, run, parts, checkpointer, data, steps_per_epoch // accelerator.num_processes, clock_start
    )
    if cfg.budget_minutes:
        parts.planner = BudgetPlanner(
            cfg,
            accelerator,
            scheduler,
            steps_per_epoch // accelerator.num_processes,
            steps_per_epoch,
            len(data.val_idx) / len(data.train_idx),
            validator.per_epoch,
            clock_start,
        )
        parts.planner.apply(state)  # a resumed run keeps the schedule its plan set
    with StopFlag() as stop:
        while state.epoch < state.epochs(cfg) and not validator.stopped:
            loader.set_epoch(state.epoch)  # accelerate's loader forwards it to ShuffledIndices
            epoch_loader = (
                accelerator.skip_first_batches(loader, state.step_in_epoch * cfg.grad_accum)
                if state.step_in_epoch
                else loader
            )
            train_stats = train_one_epoch(parts, epoch_loader, cfg, state, checkpointer, stop, validator)
            if not validator.stopped:  # an early stop within the epoch ends the run at that validation
                validator.validate(state, train_stats, epoch_end=True)
    if cfg.log != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return {
        "best_val_macro_f1": state.best_f1,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "elapsed_s": state.elapsed_s,
    }


def _print_header(
    accelerator, cfg: RunConfig, data: TrainingData, hr: HRSupport, run: RunDir, state: TrainState
) -> None:
    budget = (
        f" (at most: a budget of {cfg.budget_minutes:g} min, planned after the first steps)"
        if cfg.budget_minutes
        else ""
    )
    accelerator.print(
        f"train {cfg.model} ({cfg.strategy}) on {accelerator.device} x{accelerator.num_processes}: "
        f"{len(data.train_idx)} training / "
        f"{len(data.val_idx)} validation images, {len(data.label_map.classes)} classes; {cfg.epochs} epochs{budget}; "
        f"run folder {run}"
    )
    if state.global_step:
        accelerator.print(f"resumed {run} at epoch {state.epoch + 1}, step {state.step_in_epoch}")
    if hr.degradation is not None:
        report = hr.degradation_report
        accelerator.print(
            f"degradation fitted from the pairs: {hr.degradation} (held-out PSNR {report['held_out_psnr']:.2f} dB "
            f"vs {report['plain_resize_psnr']:.2f} for a plain resize)"
        )
    if hr.teacher is not None:
        teacher = hr.teacher
        took = f"reused (it took {teacher.seconds:.0f}s)" if teacher.reused else f"took {teacher.seconds:.0f}s"
        accelerator.print(
            f"HR teacher {teacher.kind} ({teacher.description}): val macro-F1 on HR twins {teacher.val_macro_f1:.4f}, "
            f"{took}"
        )


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
