"""One config object per run: recipe YAML + command-line overrides, validated, saved in the run folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lowres_birds.errors import UserError

SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class RunConfig:
    """Everything that decides a training run. Field names are the recipe keys and the CLI flags."""

    model: str = "efficientnet_lite0"
    pretrained: bool = True
    # Freeze the stem and this many early blocks (EfficientNet-style timm models); 0 trains everything.
    freeze_blocks: int = 0
    strategy: str = "upscale:224"
    epochs: int = 5
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    grad_accum: int = 1
    mixed_precision: str = "no"
    channels_last: bool = False
    device: str = "auto"
    seed: int = 42
    deterministic: bool = False
    val_fraction: float = 0.1
    label_smoothing: float = 0.0
    # Augmentation at the stored (low) resolution; all off reproduces the reference.
    hflip: bool = False
    crop_scale_min: float = 1.0
    # Whole-run time cap in minutes (0 = none): training stops after the epoch that crosses it.
    budget_minutes: float = 0.0
    # Save a resumable checkpoint every N optimizer steps as well as at each epoch end (0 = epoch end only).
    checkpoint_every: int = 0
    log: str = "none"
    # Using the high-res twins (all off by default; need upscale_train/). See distill.py.
    hr_view_ratio: float = 0.0  # share of each batch replaced by HR crops degraded like the real LR
    randaugment_ops: int = 0  # RandAugment ops on those HR crops, before degradation
    kd_weight: float = 0.0  # weight of the KL term to the HR teacher's soft labels (CE gets 1 - kd_weight)
    kd_temperature: float = 4.0
    feature_kd_weight: float = 0.0  # match the backbone's HR features from LR input
    teacher_size: int = 224  # the frozen HR teacher's input size
    # Recipe essentials.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_decay: float = 0.0  # 0 = no EMA; else evaluate and save the EMA weights
    layer_decay: float = 0.0  # layer-wise LR decay for ViTs (0 = off)
    early_stop_patience: int = 0  # epochs without a better val macro-F1 before stopping (0 = never)
    # Stratified k-fold: set by `train --folds K`; fold < 0 means the plain hold-out split.
    folds: int = 0
    fold: int = -1

    def validate(self) -> "RunConfig":
        from lowres_birds.resolution import parse_strategy

        parse_strategy(self.strategy)
        if self.epochs < 1:
            raise UserError(f"epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.freeze_blocks < 0:
            raise UserError(f"freeze_blocks must be 0 or more (got {self.freeze_blocks})")
        if self.grad_accum < 1:
            raise UserError(f"grad_accum must be at least 1 (got {self.grad_accum})")
        if self.lr <= 0:
            raise UserError(f"lr must be positive (got {self.lr})")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be between 0 and 1 (got {self.val_fraction})")
        if not 0 < self.crop_scale_min <= 1:
            raise UserError(f"crop_scale_min must be in (0, 1] (got {self.crop_scale_min})")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.mixed_precision not in PRECISIONS:
            raise UserError(f"mixed_precision must be one of {', '.join(PRECISIONS)} (got {self.mixed_precision!r})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda (got {self.device!r})")
        for name in ("hr_view_ratio", "kd_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be between 0 and 1 (got {getattr(self, name)})")
        for name in ("feature_kd_weight", "mixup_alpha", "cutmix_alpha", "layer_decay", "randaugment_ops", "early_stop_patience"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or more (got {getattr(self, name)})")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.kd_temperature <= 0:
            raise UserError(f"kd_temperature must be positive (got {self.kd_temperature})")
        if self.folds == 1 or self.folds < 0 or (self.folds and self.fold >= self.folds):
            raise UserError(f"folds must be 0 (hold-out) or at least 2, with fold < folds (got folds={self.folds}, fold={self.fold})")
        if self.log not in ("none", "tensorboard", "mlflow", "wandb"):
            raise UserError(f"log must be none, tensorboard, mlflow or wandb (got {self.log!r})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("lowres_birds.recipes").iterdir() if p.name.endswith(".yaml"))


def _read_recipe(recipe: str, depth: int = 0) -> dict[str, Any]:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {recipe} not found: pass a built-in recipe ({', '.join(recipe_names())}) or a YAML path")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        resource = resources.files("lowres_birds.recipes") / f"{recipe}.yaml"
        if not resource.is_file():
            raise UserError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipe_names())} or pass a YAML path")
        text, source = resource.read_text(encoding="utf-8"), f"recipe {recipe}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a mapping of config keys to values")
    base = data.pop("base", None)  # `base: cpu` starts from another recipe, then overrides its keys
    if base is not None:
        if depth > 8:
            raise UserError(f"{source}: 'base' recipes nest too deeply (a cycle?)")
        base_path = Path(recipe).parent / str(base) if (Path(recipe).parent / str(base)).is_file() else str(base)
        data = {**_read_recipe(str(base_path), depth + 1), **data}
    return data


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = FIELD_TYPES[key]
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key} must be a {kind} (got {value!r})") from None


def load_config(recipe: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Recipe (built-in name or YAML path), then overrides (None values are ignored), validated."""
    data = _read_recipe(recipe)
    unknown = sorted(set(data) - set(FIELD_TYPES))
    if unknown:
        raise UserError(f"recipe {recipe}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELD_TYPES)}")
    values = {k: _coerce(k, v, f"recipe {recipe}") for k, v in data.items()}
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    return RunConfig(**values).validate()


def load_run_config(path: Path) -> RunConfig:
    """The resolved config saved in a run folder."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return RunConfig(**{k: v for k, v in data.items() if k in FIELD_TYPES}).validate()
