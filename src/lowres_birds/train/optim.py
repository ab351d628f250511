"""The optimiser, schedule and device set-up of a run (one factory each; benchmarks use them too)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowres_birds.config import RunConfig
from lowres_birds.errors import UserError
from lowres_birds.model.factory import check_device
from lowres_birds.model.wrapper import BirdNet

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState
    from accelerate.scheduler import AcceleratedScheduler

# One fused kernel over all parameters instead of ~10 tensor ops per parameter: the cpu recipe trains ~15%
# faster on 2 cores (benchmarks/train_throughput.py). CPU support for fused AdamW arrived in torch 2.4.
FUSED_ADAMW = {"fused": True} if torch.torch_version.TorchVersion(torch.__version__) >= (2, 4) else {}


def create_optimizer(model: BirdNet, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW through timm's factory, for every backbone: no weight decay on biases, norms and the backbone's
    no_weight_decay() names; with layer_decay, per-depth learning rates from BirdNet.group_matcher."""
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(
        model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay or None, **FUSED_ADAMW
    )
    # timm's schedulers apply lr_scale; the LambdaLR schedule scales each group's own lr
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    return optimizer


def lr_factor(step: int, schedule: str, warmup: int, total: int, cycle: int) -> float:
    """Linear warmup from 0, then 1 (constant), a half cosine to 0 at ``total`` (transformers' formulas), or
    cosine-restarts: that half cosine over every ``cycle`` steps, back at the peak when a cycle starts (torch's
    CosineAnnealingWarmRestarts with T_mult=1, here inside the one LambdaLR the checkpoint and the budget know)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine-restarts":
        return 0.5 * (1.0 + math.cos(math.pi * ((step - warmup) % cycle) / cycle))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _factor(cfg: RunConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    cycle = max(1, round(cfg.restart_epochs * steps_per_epoch))
    return partial(lr_factor, schedule=cfg.schedule, warmup=warmup, total=epochs * steps_per_epoch, cycle=cycle)


def create_scheduler(
    optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule over the config's epochs, counted in scheduler steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _factor(cfg, steps_per_epoch, cfg.epochs))


def set_schedule_length(
    scheduler: torch.optim.lr_scheduler.LambdaLR | AcceleratedScheduler,
    cfg: RunConfig,
    steps_per_epoch: int,
    epochs: int,
) -> None:
    """Make the schedule end after ``epochs`` (the time budget's plan); steps already taken keep their place."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the LambdaLR
    inner.lr_lambdas = [_factor(cfg, steps_per_epoch, epochs) for _ in inner.lr_lambdas]


def start_processes(cfg: RunConfig) -> PartialState:
    """accelerate's process state (rank, device) before any Accelerator: a fine-tuned teacher trains in between."""
    from accelerate import PartialState

    check_device(cfg.device)
    return PartialState(cpu=cfg.device == "cpu")


def check_tracker(cfg: RunConfig) -> None:
    """Refuse a tracker whose package is missing (accelerate would only warn and log nothing), before any work."""
    if cfg.log != "none":
        from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

        available = {
            "tensorboard": is_tensorboard_available,
            "mlflow": is_mlflow_available,
            "wandb": is_wandb_available,
        }[cfg.log]
        if not available():
            raise UserError(f"--log {cfg.log} needs the {cfg.log} package: pip install {cfg.log} (or use --log none)")


def create_accelerator(cfg: RunConfig, run_dir: Path) -> Accelerator:
    """accelerate's Accelerator for the config: device, mixed precision, accumulation, tracker."""
    from accelerate import Accelerator

    check_device(cfg.device)
    check_tracker(cfg)
    return Accelerator(
        cpu=cfg.device == "cpu",
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.log == "none" else cfg.log,
        project_dir=str(run_dir),
    )
