"""One training run, set up once: :func:`open_run` checks everything that can fail and lays out the run folder;
:meth:`RunSession.create` builds what the steps need (model, optimiser, schedule, accelerator, loader, EMA, budget
plan, validator, checkpoint). The session is the one owner of the run's :class:`TrainState` and of the decision
to stop; loop.py drives it, and the benchmarks build their runs with it too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowres_birds.config import RunConfig, parse_strategy
from lowres_birds.data.tables import ImageTable
from lowres_birds.errors import TrainingInterrupted, UserError
from lowres_birds.model.factory import create_model, save_architecture
from lowres_birds.model.wrapper import BirdNet, recompute_batchnorm
from lowres_birds.run_dir import RunDir, replace_folder
from lowres_birds.train.batches import make_loader
from lowres_birds.train.budget import BudgetPlanner
from lowres_birds.train.data import (
    TeacherTargets,
    TrainingData,
    hr_support,
    load_training_data,
    without_missing_twins,
)
from lowres_birds.train.losses import class_balanced_weights
from lowres_birds.train.optim import (
    check_tracker,
    create_accelerator,
    create_optimizer,
    create_scheduler,
    start_processes,
)
from lowres_birds.train.state import Checkpointer, StopFlag, Trainee, TrainState
from lowres_birds.train.teacher import check_teacher, start_from_runs, start_from_teacher, without_unusable_start
from lowres_birds.train.validation import TrainingMeter, Validator


@dataclass
class OpenedRun:
    """A run checked and laid out, before anything trains."""

    cfg: RunConfig  # as the data allows it (no twins: no HR teacher)
    data: TrainingData
    run: RunDir
    data_dir: Path
    model: BirdNet  # initialised under the run's seed, before a fine-tuned teacher trains
    resume: bool


def build_model(cfg: RunConfig, labels: list[str]) -> BirdNet:
    """The run's model as it trains: frozen early layers, gradient checkpointing and memory layout as configured."""
    model = create_model(
        cfg.model,
        labels,
        parse_strategy(cfg.strategy).input_size,
        pretrained=cfg.pretrained,
        upscale_filter=cfg.upscale_filter,
    )
    model.freeze_early_layers(cfg.freeze_blocks)
    if cfg.grad_checkpointing:
        model.enable_grad_checkpointing()
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def config_for_data(cfg: RunConfig, table: ImageTable) -> tuple[RunConfig, list[str]]:
    """The config a run of ``cfg`` on this data trains and saves, and a notice for each change: without HR twins no
    HR teacher or HR views; without a fine-tuned teacher of its own model the student starts from pretrained
    weights."""
    cfg, twins_notice = without_missing_twins(cfg, table)
    cfg, start_notice = without_unusable_start(cfg)
    return cfg, [line for line in (twins_notice, start_notice) if line]


def open_run(cfg: RunConfig, data_dir: Path, run_dir: Path, *, resume: bool = False, force: bool = False) -> OpenedRun:
    """Check the config, the data, a resume and the teacher's fit before any training, then (a new run) replace the
    run folder and write its config, labels, architecture and split."""
    from accelerate.utils import set_seed

    if cfg.folds and cfg.fold < 0:
        raise UserError("a k-fold config trains one fold per run: set --fold K, or let `train --folds K` run them all")
    check_tracker(cfg)
    run = RunDir(run_dir)
    data = load_training_data(data_dir, cfg)
    cfg, notices = config_for_data(cfg, data.table)
    labels = list(data.label_map.classes)
    if resume:
        _check_resume(run, data)
    processes = start_processes(cfg)
    for line in notices:
        processes.print(line)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    model = build_model(cfg, labels)
    check_teacher(cfg, model, labels)
    if cfg.init_from and not resume:  # a resumed run's checkpoint holds its weights
        start_from_runs(model, [Path(run) for run in cfg.init_runs], labels)
    if not resume:  # the old folder goes only now that data and model are known good, once every process checked it
        replace_folder(run.path, force, create=False, others=[("--data", data_dir), *cfg.input_paths()])
        processes.wait_for_everyone()
        if processes.is_main_process:
            replace_folder(run.path, force)
            run.write_config(cfg)
            run.write_labels(labels)
            save_architecture(model, run)
            run.write_split(data_dir, [data.table.ids[i] for i in data.val_idx], data.table.fingerprint())
    processes.wait_for_everyone()
    return OpenedRun(cfg, data, run, Path(data_dir), model, resume)


def _check_resume(run: RunDir, data: TrainingData) -> None:
    """Refuse to resume on other data (the label set, the data fingerprint and the validation ids must be those of
    the run) or with a damaged metrics.jsonl (read now, not after the next epoch)."""
    labels, split = run.labels(), run.split()
    run.metrics(missing_ok=True)
    remedy = "resume on the data the run was trained on, or start a new run"
    if labels != list(data.label_map.classes):
        raise UserError(
            f"{run / RunDir.LABELS} lists other classes than the data ({len(labels)} vs "
            f"{len(data.label_map.classes)}); {remedy}"
        )
    if split.get("fingerprint") not in (None, data.table.fingerprint()):
        raise UserError(
            f"the data in {data.table.root} changed since {run} was trained ({RunDir.SPLIT} records other ids, files "
            f"or labels); {remedy}"
        )
    if split["val_ids"] != [data.table.ids[i] for i in data.val_idx]:
        raise UserError(f"{run / RunDir.SPLIT} records another validation split than the run's config draws; {remedy}")


@dataclass
class RunSession:
    """What a run's steps need, and the one place its TrainState changes and its stop is decided."""

    cfg: RunConfig
    run: RunDir
    data: TrainingData
    parts: Trainee
    loader: torch.utils.data.DataLoader  # prepared by accelerate: the training split, reshuffled every epoch
    state: TrainState
    checkpointer: Checkpointer
    validator: Validator
    planner: BudgetPlanner | None
    steps_per_epoch: int  # optimizer steps of one epoch in each process
    clock_start: float  # perf_counter() at the run's start (a resume: minus the time already spent)
    signals: StopFlag = field(default_factory=StopFlag)
    stop_reason: str | None = None  # why the run ends before its last epoch ("budget", "patience")
    meter: TrainingMeter = field(default_factory=TrainingMeter)
    _pace_origin: tuple[float, float] | None = None  # (epoch, elapsed_s) of this process's first validation

    @classmethod
    def create(cls, opened: OpenedRun, teacher: TeacherTargets | None = None) -> RunSession:
        """Everything the steps need; ``teacher``: the HR teacher's targets (None: the recipe distils nothing). A
        resumed run restores its checkpoint here (none yet: it stopped in its teacher)."""
        cfg, data, run, model = opened.cfg, opened.data, opened.run, opened.model
        hr = hr_support(cfg, data, teacher)
        if cfg.student_from_teacher:  # a resumed run's checkpoint replaces these weights below
            start_from_teacher(model, run)
        accelerator = create_accelerator(cfg, run.path)  # after the teacher's: one Accelerator at a time
        if hr.degradation is not None and accelerator.is_main_process:
            hr.degradation.save(run / RunDir.DEGRADATION, **hr.degradation_report)
        optimizer = create_optimizer(model, cfg)
        loader = make_loader(data.train_images, data.targets, data.train_idx, cfg.batch_size, cfg.seed, shuffle=True)
        # accelerate steps a prepared scheduler num_processes times per optimizer step: count in those units.
        processes = accelerator.num_processes
        schedule_steps = processes * math.ceil(math.ceil(len(loader) / processes) / cfg.grad_accum)
        scheduler = create_scheduler(optimizer, cfg, schedule_steps)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        ema = None
        if cfg.ema_decay > 0:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema_decay)
        class_weights = None
        if cfg.class_balanced_beta > 0:
            counts = np.bincount(data.targets[data.train_idx], minlength=len(data.label_map.classes))
            class_weights = class_balanced_weights(counts, cfg.class_balanced_beta).to(accelerator.device)
        generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
        parts = Trainee(model, optimizer, scheduler, accelerator, generator, ema, hr, class_weights)
        checkpointer = Checkpointer(run, parts)
        state = checkpointer.restore() if opened.resume and checkpointer.exists() else TrainState()
        if not state.global_step and teacher is not None and teacher.kind != "frozen" and teacher.shared_from is None:
            # The run's clock, and so its time budget, includes its teacher's training (or its soft targets').
            state.elapsed_s = teacher.seconds
        clock_start = time.perf_counter() - state.elapsed_s
        steps_per_epoch = schedule_steps // processes
        validator = Validator(data, steps_per_epoch, cfg.val_every)
        planner = None
        if cfg.budget_minutes:
            validation_share = len(data.val_idx) / len(data.train_idx)
            planner = BudgetPlanner(
                cfg, scheduler, steps_per_epoch, schedule_steps, validation_share, validator.per_epoch, clock_start
            )
            planner.apply(state.planned_epochs)  # a resumed run keeps the schedule its plan set
        return cls(cfg, run, data, parts, loader, state, checkpointer, validator, planner, steps_per_epoch, clock_start)

    # ----------------------------------------------------------------- the loop's questions

    @property
    def epochs(self) -> int:
        """The epochs this run trains: the budget's plan, else the config's."""
        return self.state.planned_epochs or self.cfg.epochs

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None or self.state.epoch >= self.epochs

    def epoch_loader(self) -> torch.utils.data.DataLoader:
        """This epoch's batches; a run resumed within an epoch skips the batches it already trained."""
        self.loader.set_epoch(self.state.epoch)  # accelerate's loader forwards it to ShuffledIndices
        done = self.state.step_in_epoch * self.cfg.grad_accum
        return self.parts.accelerator.skip_first_batches(self.loader, done) if done else self.loader

    # ----------------------------------------------------------------- changes of state

    def after_step(self) -> None:
        """Count one optimizer step; then the EMA, the budget plan, and a validation or checkpoint when due. A
        SIGINT/SIGTERM saves the checkpoint and raises TrainingInterrupted."""
        parts, state = self.parts, self.state
        if parts.ema is not None:
            parts.ema.update(parts.accelerator.unwrap_model(parts.model), step=state.global_step)
        state.step_in_epoch += 1
        state.global_step += 1
        if self.planner is not None and not state.planned_epochs:
            planned = self.planner.plan(state.global_step, state.step_in_epoch)
            if planned:
                state.planned_epochs = planned
                self.planner.apply(planned)
                parts.accelerator.print(self.planner.describe(planned))
        if self.validator.due(state.step_in_epoch):
            self.validate()  # saves the checkpoint too
        elif self.signals.signal_name or (
            self.cfg.checkpoint_every and state.global_step % self.cfg.checkpoint_every == 0
        ):
            self.checkpointer.save(state)
        if self.signals.signal_name:
            raise TrainingInterrupted(
                f"{self.signals.signal_name}: checkpoint saved at epoch {state.epoch + 1}, step {state.step_in_epoch}; "
                f"continue with: lowres-birds train --resume {self.run}"
            )

    def end_epoch(self) -> None:
        """Close the epoch with its validation (unless the run stopped at a validation within it)."""
        if self.stop_reason is None:
            self.validate(epoch_end=True)

    def validate(self, epoch_end: bool = False) -> None:
        """Score the model (its EMA if kept) on the validation split: one metrics.jsonl record, the kept weights (the
        best so far, or every validation's with ``keep: last``) and predictions, the checkpoint (a resume never redoes
        it) and the stop decision."""
        from accelerate.utils import gather_object

        cfg, parts, state, accelerator = self.cfg, self.parts, self.state, self.parts.accelerator
        started = time.perf_counter()
        train_stats = self.meter.stats(accelerator)
        evaluated = parts.ema.module if parts.ema is not None else parts.model
        val_stats, val_probs = self.validator.score(evaluated, accelerator.device)
        parts.model.train()
        state.elapsed_s = time.perf_counter() - self.clock_start
        epoch = state.epoch + 1 if epoch_end else state.epoch + state.step_in_epoch / self.steps_per_epoch
        record = {
            "epoch": epoch,
            "step": state.global_step,
            **train_stats,
            "val_macro_f1": val_stats["macro_f1"],
            "val_accuracy": val_stats["accuracy"],
            "lr": parts.scheduler.get_last_lr()[0],
            "elapsed_s": state.elapsed_s,
        }
        self._print(record)
        state.validations += 1
        if cfg.log != "none":  # the tracker's step counts validations: the epoch when validating once per epoch
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.validations)
        better = val_stats["macro_f1"] > state.best_f1
        if better:
            state.best_f1, state.best_epoch, state.best_validation = val_stats["macro_f1"], epoch, state.validations
        if better or cfg.keep == "last":
            state.kept_f1, state.kept_epoch = val_stats["macro_f1"], epoch
            if accelerator.is_main_process:
                self.run.save_weights(accelerator.unwrap_model(evaluated).state_dict())
                self.run.save_val_predictions(self.validator.val_idx, self.validator.targets, val_probs)
        if epoch_end:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        # Rank 0's clock, so every process takes the same stop decision.
        state.elapsed_s = gather_object([state.elapsed_s])[0]
        if accelerator.is_main_process:  # before the checkpoint: a resume after a failed save redoes the validation
            self.run.append_metrics(record)
        self.checkpointer.save(state)
        self.meter.reset()
        self.stop_reason = self._stop_reason(epoch)
        if self.planner is not None:
            self.planner.leave_out(time.perf_counter() - started)

    def _stop_reason(self, epoch: float) -> str | None:
        """The one stop decision, after each validation: the time budget ran out (the plan was too optimistic: the
        machine slowed) or the validation macro-F1 stopped improving for the patience."""
        cfg, state, say = self.cfg, self.state, self.parts.accelerator.print
        if state.epoch >= self.epochs:
            return None
        if cfg.budget_minutes and state.elapsed_s > cfg.budget_minutes * 60:
            say(f"time budget of {cfg.budget_minutes:g} min exceeded after epoch {epoch:g} of {self.epochs}; stopping")
            return "budget"
        if cfg.early_stop_patience and state.validations - state.best_validation >= cfg.early_stop_patience:
            say(f"no better validation macro-F1 for {cfg.early_stop_patience} validations; stopping early")
            return "patience"
        return None

    def recompute_batchnorm(self) -> None:
        """``recompute_batchnorm``: the kept weights' BatchNorm statistics over the clean training images, validated
        again and saved as the run's weights (a resume redoes it from them: the same statistics)."""
        accelerator, state = self.parts.accelerator, self.state
        model = accelerator.unwrap_model(self.parts.model)
        model.load_state_dict(self.run.weights())
        images = self.data.lr_images[self.data.train_idx]
        recompute_batchnorm(model, images, accelerator.device)
        before = state.kept_f1
        val_stats, val_probs = self.validator.score(model, accelerator.device)
        state.kept_f1 = val_stats["macro_f1"]
        if accelerator.is_main_process:
            self.run.save_weights(model.state_dict())
            self.run.save_val_predictions(self.validator.val_idx, self.validator.targets, val_probs)
        accelerator.print(
            f"BatchNorm statistics recomputed on the {len(images)} training images and their mirrors: val macro-F1 "
            f"{before:.4f} -> {state.kept_f1:.4f}"
        )

    def close(self) -> dict:
        """End the tracker and return the run's result."""
        accelerator, state = self.parts.accelerator, self.state
        if self.cfg.log != "none":
            accelerator.end_training()
        accelerator.wait_for_everyone()
        return {
            "val_macro_f1": state.kept_f1,  # of the kept weights
            "kept_epoch": state.kept_epoch,
            "keep": self.cfg.keep,
            "epochs_run": state.epoch,
            "elapsed_s": state.elapsed_s,
        }

    # ----------------------------------------------------------------- what it says

    def start(self) -> None:
        """Say what trains (and what was resumed or reused), and open the experiment tracker."""
        cfg, data, hr, accelerator = self.cfg, self.data, self.parts.hr, self.parts.accelerator
        budget = (
            f" (at most: a budget of {cfg.budget_minutes:g} min, planned after the first steps)"
            if cfg.budget_minutes
            else ""
        )
        unlabelled = f" ({len(data.unlabelled_idx)} of them unlabelled photos)" if len(data.unlabelled_idx) else ""
        accelerator.print(
            f"train {cfg.model} ({cfg.strategy}) on {accelerator.device} x{accelerator.num_processes}: "
            f"{len(data.train_idx)} training{unlabelled} / {len(data.val_idx)} validation images, "
            f"{len(data.label_map.classes)} classes; {cfg.epochs} epochs{budget}; run folder {self.run}"
        )
        if self.state.global_step:
            accelerator.print(f"resumed {self.run} at epoch {self.state.epoch + 1}, step {self.state.step_in_epoch}")
        if hr.degradation is not None:
            report = hr.degradation_report
            accelerator.print(
                f"degradation fitted from the pairs: {hr.degradation} (held-out PSNR {report['held_out_psnr']:.2f} dB "
                f"vs {report['plain_resize_psnr']:.2f} for a plain resize)"
            )
        if hr.family is not None:
            source = "HR views" if hr.hr_images is not None else "LR images (no twins)"
            accelerator.print(f"randomised degradations: {cfg.hr_view_ratio:g} of each batch, {source}, {hr.family}")
        teacher = hr.teacher
        if teacher is not None:
            took = f"reused (it took {teacher.seconds:.0f}s)" if teacher.reused else f"took {teacher.seconds:.0f}s"
            if teacher.kind == "distilled":
                accelerator.print(
                    f"distilling from {teacher.description}: macro-F1 {teacher.val_macro_f1:.4f} on this split's "
                    f"validation images (which its runs may have trained on), {took}"
                )
            else:
                accelerator.print(
                    f"HR teacher {teacher.kind} ({teacher.description}): val macro-F1 on HR twins "
                    f"{teacher.val_macro_f1:.4f}, {took}"
                )
        if cfg.log != "none":
            accelerator.init_trackers("lowres-birds", config=cfg.to_dict())

    def _print(self, record: dict) -> None:
        """One line per validation; the time left is paced on this process's own validations (not on a teacher's
        training or a run before a resume), on the whole elapsed time until there are two."""
        origin_epoch, origin_s = self._pace_origin or (0.0, 0.0)
        remaining = (
            (record["elapsed_s"] - origin_s) / (record["epoch"] - origin_epoch) * (self.epochs - record["epoch"])
        )
        self._pace_origin = self._pace_origin or (record["epoch"], record["elapsed_s"])
        self.parts.accelerator.print(
            f"epoch {record['epoch']:g}/{self.epochs}  loss {record['train_loss']:.4f}  val macro-F1 "
            f"{record['val_macro_f1']:.4f}  acc {record['val_accuracy']:.4f}  "
            f"{record['train_images_per_s']:.0f} img/s  {record['elapsed_s']:.0f}s (~{remaining:.0f}s left)"
        )
