"""Training: plain ``train_one_epoch`` / ``evaluate`` in the style of torchvision's references, run through
accelerate (CPU, GPU, mixed precision, ``accelerate launch``/``torchrun`` with no code change).

Images live in memory as uint8 arrays; a batch is built by indexing, moved to the device, augmented
and resized there (inside the model wrapper). One checkpoint dict (model, optimiser, scheduler, epoch,
step within the epoch, RNG states) makes ``--resume`` continue exactly where a run stopped.
"""

from __future__ import annotations

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
from lowres_birds.resolution import HR_SIZE, LR_SIZE, Strategy, parse_strategy

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
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
    """collate_fn: a list of indices -> (uint8 NCHW images, int64 labels) gathered from memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.asarray(indices)
        batch = torch.from_numpy(np.ascontiguousarray(self.images[order])).permute(0, 3, 1, 2)
        return batch, torch.from_numpy(self.labels[order])


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


def train_one_epoch(model, loader, optimizer, scheduler, accelerator, cfg, generator, state, on_step) -> dict:
    """One pass over the training batches; returns mean loss and images/s."""
    model.train()
    total_loss, seen, started = 0.0, 0, time.perf_counter()
    bar = tqdm(
        loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", initial=state.step_in_epoch * cfg.grad_accum,
        total=len(loader) + state.step_in_epoch * cfg.grad_accum, disable=not accelerator.is_local_main_process,
        leave=False, mininterval=1.0, dynamic_ncols=True,
    )
    for images, labels in bar:
        with accelerator.accumulate(model):
            images = augment_batch(images, cfg, generator)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
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
    for images, labels in loader:
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


def load_training_data(data_dir: Path, strategy: Strategy, val_fraction: float, seed: int) -> TrainingData:
    table = load_train_table(data_dir)
    label_map = LabelMap.fit(table.labels)
    targets = label_map.encode(table.labels)
    train_idx, val_idx = stratified_split(targets, val_fraction, seed)
    lr_images = load_images(table.lr_paths, LR_SIZE)
    if strategy.train_source == "hr":
        if table.hr_paths is None:
            raise UserError(f"strategy {strategy} trains on the high-res twins, but {data_dir} has no upscale_img_path column")
        train_images = load_images(table.hr_paths, HR_SIZE)
    else:
        train_images = lr_images
    return TrainingData(table, label_map, targets, lr_images, train_images, train_idx, val_idx)


def train(cfg: RunConfig | None, data_dir: Path, run_dir: Path, resume: bool = False, force: bool = False) -> dict:
    """Train one run (or resume it with its saved config, cfg=None); returns the best validation metrics."""
    from accelerate.utils import gather_object, set_seed
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    if resume:
        prepare_run_dir(run_dir, resume=True, force=False)
        cfg = load_run_config(run_dir / "config.yaml")
    strategy = parse_strategy(cfg.strategy)
    data = load_training_data(data_dir, strategy, cfg.val_fraction, cfg.seed)
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
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # accelerate steps a prepared scheduler num_processes times per optimizer step: count in those units.
    steps_per_epoch = accelerator.num_processes * math.ceil(math.ceil(len(train_loader) / accelerator.num_processes) / cfg.grad_accum)
    scheduler = _make_scheduler(optimizer, cfg, steps_per_epoch)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, val_loader, scheduler)
    generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    state = TrainState()
    if resume:
        checkpoint = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        accelerator.unwrap_model(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
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
            train_stats = train_one_epoch(model, loader, optimizer, scheduler, accelerator, cfg, generator, state, on_step)
            val_stats, _, _ = evaluate(model, val_loader, accelerator)
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
                    weights = {k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
                    temporary = run_dir / f".{BEST_WEIGHTS}.tmp"
                    save_file(weights, str(temporary))
                    os.replace(temporary, run_dir / BEST_WEIGHTS)
            # Rank 0's view everywhere, so every process takes the same time-budget decision below.
            state.best_f1, state.best_epoch, state.elapsed_s = gather_object([(state.best_f1, state.best_epoch, state.elapsed_s)])[0]
            state.epoch += 1
            state.step_in_epoch = 0
            save_checkpoint()
            if cfg.budget_minutes and state.elapsed_s > cfg.budget_minutes * 60 and state.epoch < cfg.epochs:
                accelerator.print(f"time budget of {cfg.budget_minutes} min reached after epoch {state.epoch}; stopping")
                break
    if cfg.log != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return {"best_val_macro_f1": state.best_f1, "best_epoch": state.best_epoch, "epochs_run": state.epoch, "elapsed_s": state.elapsed_s}
