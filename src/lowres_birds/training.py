"""Training: plain ``train_one_epoch`` / ``evaluate`` in the style of torchvision's references, run through
accelerate (CPU, GPU, mixed precision, ``accelerate launch``/``torchrun`` with no code change).

Images live in memory as uint8 arrays; a batch is built by indexing, moved to the device, augmented
and resized there (inside the model wrapper). One checkpoint dict (model, optimiser, scheduler, epoch,
step within the epoch, RNG states) makes ``--resume`` continue exactly where a run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lowres_birds.config import RunConfig, load_run_config
from lowres_birds.data import ImageTable, LabelMap, load_images, load_train_table, stratified_split
from lowres_birds.errors import TrainingInterrupted, UserError
from lowres_birds.metrics import score
from lowres_birds.models import BirdNet, create_model, save_architecture
from lowres_birds.degradation import Degradation
from lowres_birds.distill import TeacherTargets, build_teacher, feature_loss, fitted_degradation, fold_indices, hf_layer_decay_groups, hr_views, kd_loss, mix_batch
from lowres_birds.resolution import HR_SIZE, LR_SIZE, gather_nchw, parse_strategy

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
VAL_PREDICTIONS = "val_predictions.npz"  # the best model's validation probabilities (out-of-fold scoring)
MIN_FREE_BYTES_FACTOR = 2  # a checkpoint write needs twice the last checkpoint's size free


# --------------------------------------------------------------------------- batches


class ShuffledIndices(Dataset):
    """Positions 0..n-1 mapped to a per-epoch permutation of ``indices``, seeded by (seed, epoch).

    Keeping the shuffle here (not in a sampler) makes the order reproducible across resumes and
    identical under accelerate's batch sharding.
    """

    def __init__(self, indices: np.ndarray, seed: int, shuffle: bool):
        self.indices, self.seed, self.shuffle = indices, seed, shuffle
        self.order = indices

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.order = np.random.default_rng([self.seed, epoch]).permutation(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> int:
        return int(self.order[position])


class BatchGather:
    """collate_fn: a list of indices -> (uint8 NCHW images, int64 labels, the indices) gathered from memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        # A plain view of the memory-mapped cache: np.memmap's Python-level __getitem__ costs ~0.05 ms a batch.
        self.images, self.labels = np.asarray(images), labels

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        order = np.asarray(indices)
        return gather_nchw(self.images, order), torch.from_numpy(self.labels[order]), torch.from_numpy(order)


def make_loader(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch_size: int, seed: int, shuffle: bool) -> DataLoader:
    return DataLoader(
        ShuffledIndices(indices, seed, shuffle), batch_size=batch_size, shuffle=False, collate_fn=BatchGather(images, labels)
    )


def augment_batch(images: torch.Tensor, cfg: RunConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-image random flip and random-resized crop at the stored resolution (uint8 in, uint8 out)."""
    from torchvision.transforms.v2 import functional as TF

    if cfg.hflip:
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    if cfg.crop_scale_min < 1.0:
        size = images.shape[-1]
        crops = []
        for image in images:
            scale = cfg.crop_scale_min + (1 - cfg.crop_scale_min) * torch.rand(1, generator=generator).item()
            side = max(8, int(round(size * math.sqrt(scale))))
            top, left = (torch.randint(0, size - side + 1, (2,), generator=generator)).tolist()
            crops.append(TF.resized_crop(image, top, left, side, side, [size, size], antialias=True))
        images = torch.stack(crops)
    return images


@dataclass
class HRSupport:
    """What the high-res twins add to each training step; absent parts are off."""

    hr_images: np.ndarray | None = None
    degradation: Degradation | None = None
    teacher: TeacherTargets | None = None


def training_loss(model, images, labels, indices, cfg: RunConfig, generator: torch.Generator, hr: HRSupport) -> torch.Tensor:
    """Augment (LR and HR-derived views), mix, forward, and combine CE with the distillation terms."""
    images = augment_batch(images, cfg, generator)
    if hr.degradation is not None and cfg.hr_view_ratio > 0:
        chosen = torch.rand(len(images), generator=generator) < cfg.hr_view_ratio
        if chosen.any():
            hr_batch = gather_nchw(hr.hr_images, indices[chosen].numpy())
            views = hr_views(hr_batch, hr.degradation, cfg.crop_scale_min, cfg.randaugment_ops, generator)
            images = images.clone()
            images[chosen.to(images.device)] = views.to(images.device)
    num_classes = accelerate_unwrap(model).spec.num_classes
    targets = [F.one_hot(labels, num_classes).float()]
    if hr.teacher is not None:
        device_indices = indices.to(hr.teacher.logits.device)
        targets += [
            F.softmax(hr.teacher.logits[device_indices] / cfg.kd_temperature, dim=-1).to(images.device),
            hr.teacher.features[device_indices].to(images.device),
        ]
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        images, targets = mix_batch(images, targets, cfg.mixup_alpha, cfg.cutmix_alpha, generator)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if hr.teacher is not None and cfg.feature_kd_weight > 0:
        features, logits = model(images, return_features=True)
    else:
        features, logits = None, model(images)
    soft_labels = targets[0] * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
    loss = -(soft_labels * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    if hr.teacher is not None and cfg.kd_weight > 0:
        loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd_loss(logits.float(), targets[1], cfg.kd_temperature)
    if hr.teacher is not None and cfg.feature_kd_weight > 0:
        loss = loss + cfg.feature_kd_weight * feature_loss(features.float(), targets[2])
    return loss


def accelerate_unwrap(model):
    """The BirdNet inside a DDP/compile wrapper (or the model itself)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


# --------------------------------------------------------------------------- state


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or next to run)
    step_in_epoch: int = 0  # optimizer steps already done in that epoch
    global_step: int = 0
    best_f1: float = -1.0
    best_epoch: int = -1
    elapsed_s: float = 0.0


def _rng_state(generator: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "augment": generator.get_state(),
    }


def _restore_rng(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves half a checkpoint."""
    previous = path.stat().st_size if path.exists() else 0
    free = shutil.disk_usage(path.parent).free
    if previous and free < MIN_FREE_BYTES_FACTOR * previous:
        raise UserError(
            f"only {free / 1e6:.0f} MB free in {path.parent}, a checkpoint needs about {previous / 1e6:.0f} MB; "
            "free some space and resume (the previous checkpoint is intact)"
        )
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and stops cleanly."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the loop


def train_one_epoch(model, loader, optimizer, scheduler, accelerator, cfg, generator, state, on_step, hr: HRSupport | None = None, ema=None) -> dict:
    """One pass over the training batches; returns mean loss and images/s."""
    hr = hr or HRSupport()
    model.train()
    total_loss, seen, started = 0.0, 0, time.perf_counter()
    bar = tqdm(
        loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", initial=state.step_in_epoch * cfg.grad_accum,
        total=len(loader) + state.step_in_epoch * cfg.grad_accum, disable=not accelerator.is_local_main_process,
        leave=False, mininterval=1.0, dynamic_ncols=True,
    )
    for images, labels, indices in bar:
        with accelerator.accumulate(model):
            loss = training_loss(model, images, labels, indices, cfg, generator, hr)
            if not torch.isfinite(loss):
                raise UserError(
                    f"loss became {loss.item()} at epoch {state.epoch + 1}; lower --lr or use --mixed-precision no "
                    "(the last good checkpoint is kept; resume with --resume)"
                )
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total_loss += loss.item() * len(labels)
        seen += len(labels)
        if accelerator.sync_gradients:
            if ema is not None:
                ema.update(accelerate_unwrap(model), step=state.global_step)
            state.step_in_epoch += 1
            state.global_step += 1
            on_step()
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", img_s=f"{seen / (time.perf_counter() - started):.0f}")
    bar.close()
    elapsed = time.perf_counter() - started
    total_loss, seen = accelerator.reduce(torch.tensor([total_loss, seen], dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return {"train_loss": total_loss / max(seen, 1), "train_images_per_s": seen / elapsed}


@torch.no_grad()
def evaluate(model, loader, accelerator) -> tuple[dict, np.ndarray, np.ndarray]:
    """Macro-F1 and accuracy over the whole validation set (gathered across processes)."""
    model.eval()
    all_probs, all_labels = [], []
    for images, labels, _ in loader:
        probs = model(images).float().softmax(-1)
        probs, labels = accelerator.gather_for_metrics((probs, labels))
        all_probs.append(probs.cpu())
        all_labels.append(labels.cpu())
    probs = torch.cat(all_probs).numpy()
    labels = torch.cat(all_labels).numpy()
    return score(labels, probs.argmax(1)), probs, labels


def _make_scheduler(optimizer, cfg: RunConfig, steps_per_epoch: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, cfg.epochs * steps_per_epoch)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _make_accelerator(cfg: RunConfig, run_dir: Path):
    from accelerate import Accelerator

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if cfg.log != "none":  # accelerate would only warn and log nothing
        from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "mlflow": is_mlflow_available, "wandb": is_wandb_available}[cfg.log]
        if not available():
            raise UserError(f"--log {cfg.log} needs the {cfg.log} package: pip install {cfg.log} (or use --log none)")
    return Accelerator(
        cpu=cfg.device == "cpu",
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.log == "none" else cfg.log,
        project_dir=str(run_dir),
    )


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, create: bool = True) -> None:
    """Check the run folder on every process; only the one with ``create`` (the main process) changes it."""
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise UserError(f"{run_dir} has no {CHECKPOINT} to resume from; start a new run without --resume")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is a file; choose another --out")
    if run_dir.exists() and not force and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} already exists; pass --resume to continue it or --force to overwrite")
    if create:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)


@dataclass
class TrainingData:
    """Decoded arrays and the split, shared by train, report and study."""

    table: ImageTable
    label_map: LabelMap
    targets: np.ndarray
    lr_images: np.ndarray
    train_images: np.ndarray  # LR or HR, by strategy
    train_idx: np.ndarray
    val_idx: np.ndarray
    hr_images: np.ndarray | None  # the 256x256 twins, when the strategy or the HR techniques need them


def uses_hr_twins(cfg: RunConfig) -> bool:
    return cfg.hr_view_ratio > 0 or cfg.kd_weight > 0 or cfg.feature_kd_weight > 0


def load_training_data(data_dir: Path, cfg: RunConfig) -> TrainingData:
    """Decode (or read from cache) what the run needs; the split is the hold-out or fold ``cfg.fold``."""
    strategy = parse_strategy(cfg.strategy)
    table = load_train_table(data_dir)
    label_map = LabelMap.fit(table.labels)
    targets = label_map.encode(table.labels)
    if cfg.folds:
        train_idx, val_idx = fold_indices(targets, cfg.folds, cfg.fold, cfg.seed)
    else:
        train_idx, val_idx = stratified_split(targets, cfg.val_fraction, cfg.seed)
    lr_images = load_images(table.lr_paths, LR_SIZE)
    hr_images = None
    if strategy.train_source == "hr" or uses_hr_twins(cfg):
        if table.hr_paths is None:
            raise UserError(f"{cfg.strategy} / the HR techniques need the high-res twins, but {data_dir} has no upscale_img_path column")
        hr_images = load_images(table.hr_paths, HR_SIZE)
    train_images = hr_images if strategy.train_source == "hr" else lr_images
    return TrainingData(table, label_map, targets, lr_images, train_images, train_idx, val_idx, hr_images)


def hr_support(cfg: RunConfig, data: TrainingData, run_dir: Path, accelerator) -> HRSupport:
    """Fit the degradation and build the HR teacher when the recipe asks for them (cached across runs)."""
    support = HRSupport(hr_images=data.hr_images)
    if cfg.hr_view_ratio > 0:
        support.degradation, report = fitted_degradation(data.hr_images, data.lr_images)
        if accelerator.is_main_process:
            support.degradation.save(run_dir / "degradation.json", **report)
        accelerator.print(
            f"degradation fitted from the pairs: {support.degradation} (held-out PSNR {report['held_out_psnr']:.2f} dB "
            f"vs {report['plain_resize_psnr']:.2f} for a plain resize)"
        )
    if cfg.kd_weight > 0 or cfg.feature_kd_weight > 0:
        labels = list(data.label_map.classes)
        support.teacher = build_teacher(cfg.model, labels, data.hr_images, data.targets, data.train_idx, data.val_idx, cfg.teacher_size)
        accelerator.print(f"HR teacher ({cfg.model} frozen at {cfg.teacher_size}, logistic head): val macro-F1 on HR twins {support.teacher.val_macro_f1:.4f}")
    return support


# One fused kernel over all parameters instead of ~10 tensor ops per parameter: the cpu recipe trains ~15%
# faster on 2 cores (benchmarks/train_throughput.py). CPU support for fused AdamW arrived in torch 2.4.
FUSED_ADAMW = {"fused": True} if torch.torch_version.TorchVersion(torch.__version__) >= (2, 4) else {}


def _make_optimizer(model: BirdNet, cfg: RunConfig):
    """AdamW; with layer_decay, per-layer learning rates (timm's groups for timm models, BEiT-style for HF)."""
    if cfg.layer_decay <= 0:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay, **FUSED_ADAMW)
    if cfg.model.startswith("hf:"):
        return torch.optim.AdamW(hf_layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay), **FUSED_ADAMW)
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model.backbone, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, **FUSED_ADAMW)


def train(cfg: RunConfig | None, data_dir: Path, run_dir: Path, resume: bool = False, force: bool = False) -> dict:
    """Train one run (or resume it with its saved config, cfg=None); returns the best validation metrics."""
    from accelerate.utils import gather_object, set_seed
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    if resume:
        prepare_run_dir(run_dir, resume=True, force=False)
        cfg = load_run_config(run_dir / "config.yaml")
    if cfg.folds and cfg.fold < 0:
        raise UserError("a k-fold config trains one fold per run: set --fold K, or let `train --folds K` run them all")
    strategy = parse_strategy(cfg.strategy)
    data = load_training_data(data_dir, cfg)
    accelerator = _make_accelerator(cfg, run_dir)
    if not resume:
        prepare_run_dir(run_dir, resume=False, force=force, create=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    labels = list(data.label_map.classes)
    model = create_model(cfg.model, labels, strategy.input_size, pretrained=cfg.pretrained)
    model.freeze_early_layers(cfg.freeze_blocks)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if accelerator.is_main_process and not resume:
        cfg.save(run_dir / "config.yaml")
        data.label_map.save(run_dir / "labels.json")
        save_architecture(model, run_dir)
        (run_dir / "split.json").write_text(
            json.dumps({"val_ids": [data.table.ids[i] for i in data.val_idx], "data": str(Path(data_dir).resolve())}),
            encoding="utf-8",
        )
    train_loader = make_loader(data.train_images, data.targets, data.train_idx, cfg.batch_size, cfg.seed, shuffle=True)
    val_loader = make_loader(data.lr_images, data.targets, data.val_idx, max(cfg.batch_size, 64), cfg.seed, shuffle=False)
    hr = hr_support(cfg, data, run_dir, accelerator)
    optimizer = _make_optimizer(model, cfg)
    # accelerate steps a prepared scheduler num_processes times per optimizer step: count in those units.
    steps_per_epoch = accelerator.num_processes * math.ceil(math.ceil(len(train_loader) / accelerator.num_processes) / cfg.grad_accum)
    scheduler = _make_scheduler(optimizer, cfg, steps_per_epoch)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, val_loader, scheduler)
    generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema_decay)
    state = TrainState()
    if resume:
        checkpoint = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        accelerator.unwrap_model(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        state = TrainState(**checkpoint["state"])
        _restore_rng(checkpoint["rng"][min(accelerator.process_index, len(checkpoint["rng"]) - 1)], generator)
        accelerator.print(f"resumed {run_dir} at epoch {state.epoch + 1}, step {state.step_in_epoch}")
    if cfg.log != "none":
        accelerator.init_trackers("lowres-birds", config=cfg.to_dict())

    def save_checkpoint() -> None:
        rng_states = gather_object([_rng_state(generator)])
        if accelerator.is_main_process:
            atomic_save(
                {
                    "model": accelerator.unwrap_model(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": state.__dict__,
                    "rng": rng_states,
                    "ema": ema.state_dict() if ema is not None else None,
                },
                run_dir / CHECKPOINT,
            )

    clock_start = time.perf_counter() - state.elapsed_s
    with StopFlag() as stop:

        def on_step() -> None:
            state.elapsed_s = time.perf_counter() - clock_start
            interrupt = stop.signal_name is not None
            if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0 or interrupt:
                save_checkpoint()
            if interrupt:
                raise TrainingInterrupted(
                    f"{stop.signal_name}: checkpoint saved at epoch {state.epoch + 1}, step {state.step_in_epoch}; "
                    f"continue with: lowres-birds train --resume {run_dir}"
                )

        while state.epoch < cfg.epochs:
            train_loader.set_epoch(state.epoch)  # accelerate's loader forwards it to ShuffledIndices
            loader = train_loader
            if state.step_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, state.step_in_epoch * cfg.grad_accum)
            train_stats = train_one_epoch(model, loader, optimizer, scheduler, accelerator, cfg, generator, state, on_step, hr, ema)
            evaluated = ema.module if ema is not None else model
            val_stats, val_probs, _ = evaluate(evaluated, val_loader, accelerator)
            state.elapsed_s = time.perf_counter() - clock_start
            record = {
                "epoch": state.epoch + 1, **train_stats, "val_macro_f1": val_stats["macro_f1"],
                "val_accuracy": val_stats["accuracy"], "lr": scheduler.get_last_lr()[0], "elapsed_s": state.elapsed_s,
            }
            accelerator.print(
                f"epoch {record['epoch']}/{cfg.epochs}  loss {record['train_loss']:.4f}  val macro-F1 {record['val_macro_f1']:.4f}  "
                f"acc {record['val_accuracy']:.4f}  {record['train_images_per_s']:.0f} img/s  {state.elapsed_s:.0f}s"
            )
            if cfg.log != "none":
                accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
            if accelerator.is_main_process:
                with open(run_dir / METRICS, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                if val_stats["macro_f1"] > state.best_f1:
                    state.best_f1, state.best_epoch = val_stats["macro_f1"], record["epoch"]
                    weights = {k: v.contiguous() for k, v in accelerator.unwrap_model(evaluated).state_dict().items()}
                    temporary = run_dir / f".{BEST_WEIGHTS}.tmp"
                    save_file(weights, str(temporary))
                    os.replace(temporary, run_dir / BEST_WEIGHTS)
                    np.savez(run_dir / VAL_PREDICTIONS, indices=data.val_idx, targets=data.targets[data.val_idx], probs=val_probs)
            # Rank 0's view everywhere, so every process takes the same time-budget decision below.
            state.best_f1, state.best_epoch, state.elapsed_s = gather_object([(state.best_f1, state.best_epoch, state.elapsed_s)])[0]
            state.epoch += 1
            state.step_in_epoch = 0
            save_checkpoint()
            if cfg.budget_minutes and state.elapsed_s > cfg.budget_minutes * 60 and state.epoch < cfg.epochs:
                accelerator.print(f"time budget of {cfg.budget_minutes} min reached after epoch {state.epoch}; stopping")
                break
            if cfg.early_stop_patience and state.epoch - state.best_epoch >= cfg.early_stop_patience and state.epoch < cfg.epochs:
                accelerator.print(f"no better validation macro-F1 for {cfg.early_stop_patience} epochs; stopping early")
                break
    if cfg.log != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return {"best_val_macro_f1": state.best_f1, "best_epoch": state.best_epoch, "epochs_run": state.epoch, "elapsed_s": state.elapsed_s}


def train_folds(cfg: RunConfig, data_dir: Path, out_dir: Path, force: bool = False) -> dict:
    """Stratified K-fold: one self-contained run per fold under OUT/fold<k>, then the out-of-fold macro-F1.

    The fold runs can be averaged at test time with ``predict --run OUT/fold0 --run OUT/fold1 ...``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} already exists; pass --force to overwrite it")
    folds = []
    for fold in range(cfg.folds):
        result = train(dataclasses.replace(cfg, fold=fold), data_dir, out_dir / f"fold{fold}", force=force)
        folds.append(result["best_val_macro_f1"])
    predictions = [np.load(out_dir / f"fold{fold}" / VAL_PREDICTIONS) for fold in range(cfg.folds)]
    targets = np.concatenate([p["targets"] for p in predictions])
    predicted = np.concatenate([p["probs"].argmax(1) for p in predictions])
    summary = {"folds": cfg.folds, "fold_val_macro_f1": folds, **{f"oof_{k}": v for k, v in score(targets, predicted).items()}}
    (out_dir / "oof.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
