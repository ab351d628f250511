"""A trained run as a Hugging Face folder: what ``transformers.pipeline("image-classification", model=DIR)``
loads offline, with a model card. ``Classifier.load(DIR)`` reads it back.

Two kinds, by backbone:

* timm backbones (``efficientnet_lite0``, ``timm:<name>``): timm's own Hub layout, which transformers loads
  through its timm wrapper (``TimmWrapperForImageClassification``, transformers >= 4.47) and timm through
  ``timm.create_model("local-dir:DIR", pretrained=True)``. ``config.json`` holds the architecture, the
  class names (``label_names``) and the preprocessing (``pretrained_cfg``: the run's input size, its resize
  filter, its mean and std, no crop), ``model.safetensors`` the backbone's weights under timm's names. Writing it
  needs no transformers.
* Hugging Face backbones (``hf:``): the backbone's ``config.json`` (with ``id2label``), its weights, and a
  ``preprocessor_config.json`` that resizes to the run's input size with the run's filter and normalises with
  the run's mean and std.

The pipeline resizes 64x64 photos to the input size with PIL's bicubic or Lanczos (timm) or torchvision's
uint8 kernel (transformers), the resize the model wrapper reproduces, so both agree with ``lowres-birds`` on
the top-1 class. Neither has the ``robidoux-sharp`` filter, so runs trained with it are refused. Both kinds
also carry ``lowres_birds`` in ``config.json`` (source, strategy, resize, filter, photo size), which others ignore. Every file goes through ``atomic_write``; the folder is made by ``replace_folder``
(--force replaces only a folder this tool made).

A calibrated run's temperature is folded into the classifier's weight and bias (divided by T), so the pipeline's
softmax gives the calibrated probabilities; its unknown score and threshold are in ``config.json`` (``lowres_birds``
-> ``unknown``) and the model card, and as ``calibration.json`` (temperature 1: already folded) with the score's
statistics (``unknown.safetensors``), which ``Classifier.load(DIR)`` applies.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import torch

from lowres_birds import __version__
from lowres_birds.config import LR_SIZE, RunConfig, parse_strategy
from lowres_birds.errors import UserError
from lowres_birds.extras import require as require_extra
from lowres_birds.model.calibration import SCORES, STATISTICS
from lowres_birds.model.ensemble import distillation_line
from lowres_birds.model.factory import OFFLINE_LITE, check_device, load_run_model, timm_architecture
from lowres_birds.model.wrapper import BirdNet, ModelSpec
from lowres_birds.run_dir import (
    RunDir,
    check_labels,
    load_json,
    load_safetensors,
    replace_folder,
    save_safetensors,
    write_json,
    write_text,
)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PROCESSOR = "preprocessor_config.json"
CARD = "README.md"
OURS = "lowres_birds"  # our key in config.json
# The run's upscale_filter as timm's pretrained_cfg names it and as transformers' processors store it (PIL's number).
TIMM_INTERPOLATION = {"bicubic": "bicubic", "lanczos": "lanczos"}
PIL_RESAMPLE = {"bicubic": 3, "lanczos": 1}


def is_hf_folder(path: Path) -> bool:
    """A folder with a Hugging Face ``config.json`` that is not a run folder."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and not (path / RunDir.SPEC).is_file()


# --------------------------------------------------------------------------- writing


def write_hf_folder(run_dir: Path, out: Path, force: bool = False) -> Path:
    """Write the run's kept weights as a Hugging Face folder at ``out``; returns ``out``."""
    run = RunDir(run_dir).require()
    replace_folder(out, force, create=False, others=[("--run", run.path)])  # refused before any work
    model, labels = load_run_model(run.path)
    cfg = run.config()
    spec = model.spec
    if spec.upscale_filter not in TIMM_INTERPOLATION:
        raise UserError(
            f"{run.path} was trained with upscale_filter {spec.upscale_filter}, which timm's and transformers' "
            "preprocessing "
            "cannot reproduce (they resize with PIL's or torchvision's filters); export it with --format onnx, or use "
            "the run folder"
        )
    is_hf = spec.source.startswith("hf:")
    if is_hf:
        require_extra("hf", "export --format hf of a Hugging Face model")
    saved = run.calibration(SCORES, STATISTICS, len(labels), model.feature_width)
    if saved is not None:
        classifier = model.backbone.get_classifier() if hasattr(model.backbone, "get_classifier") else None
        classifier = classifier or getattr(model.backbone, "classifier", None)
        if not isinstance(classifier, torch.nn.Linear):
            raise UserError(
                f"{run.path}: the classifier of {spec.source} is not one linear layer, so its temperature cannot be "
                "folded into it; export it with --format onnx"
            )
        with torch.no_grad():
            classifier.weight /= saved[0]["temperature"]
            classifier.bias /= saved[0]["temperature"]
    ours = {
        "source": spec.source,
        "strategy": cfg.strategy,
        "resize": spec.resize,
        "upscale_filter": spec.upscale_filter,
        "image_size": LR_SIZE,
        "version": __version__,
    }
    if saved is not None:
        ours["unknown"] = {
            "score": saved[0]["score"],
            "threshold": saved[0]["threshold"],
            "temperature_folded": saved[0]["temperature"],
        }
    # the card reads the rest of the run folder: a damaged one is refused before the output folder is touched
    card = model_card(run, cfg, model, labels, "transformers" if is_hf else "timm", out, ours.get("unknown"))
    replace_folder(out, force, others=[("--run", run.path)])
    if saved is not None:
        folded = {**saved[0], "temperature": 1.0, "temperature_folded": saved[0]["temperature"]}
        RunDir(out).write_calibration(folded, saved[1])
    if is_hf:
        _write_transformers_files(model, out, ours)
    else:
        _write_timm_files(model, labels, out, ours)
    write_text(out / CARD, card)
    return out


def _write_timm_files(model: BirdNet, labels: list[str], out: Path, ours: dict) -> None:
    backbone, spec = model.backbone, model.spec
    own_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    architecture = (
        timm_architecture(spec.source)
        if spec.source in OFFLINE_LITE
        else own_cfg.get("architecture") or timm_architecture(spec.source)
    )
    size = spec.input_size
    pretrained_cfg = {
        "input_size": [3, size, size],
        "fixed_input_size": bool(own_cfg.get("fixed_input_size", False)),
        "interpolation": TIMM_INTERPOLATION[spec.upscale_filter],
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "num_classes": len(labels),
        **{key: own_cfg[key] for key in ("first_conv", "classifier") if key in own_cfg},
    }
    config = {
        "architecture": architecture,
        "num_classes": len(labels),
        "num_features": int(getattr(backbone, "num_features", 0)) or None,
        "label_names": list(labels),
        "pretrained_cfg": pretrained_cfg,
        OURS: ours,
    }
    if own_cfg.get("fixed_input_size"):  # ViTs: the patch grid was built for the run's input size
        config["model_args"] = {"img_size": size}
    write_json(out / CONFIG, config)
    save_safetensors(out / WEIGHTS, backbone.state_dict(), metadata={"format": "pt"})


def _write_transformers_files(model: BirdNet, out: Path, ours: dict) -> None:
    from transformers import ViTImageProcessor

    backbone, spec = model.backbone, model.spec
    config = backbone.config
    config.architectures = [type(backbone).__name__]
    setattr(config, OURS, ours)
    write_text(out / CONFIG, config.to_json_string())
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": spec.input_size, "width": spec.input_size},
        resample=PIL_RESAMPLE[spec.upscale_filter],
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )
    write_text(out / PROCESSOR, processor.to_json_string())
    save_safetensors(out / WEIGHTS, backbone.state_dict(), metadata={"format": "pt"})


# --------------------------------------------------------------------------- the model card


def model_card(
    run: RunDir, cfg: RunConfig, model: BirdNet, labels: list[str], library: str, out: Path, unknown: dict | None = None
) -> str:
    """README.md: what the model is, how to load it, how it was trained, its scores and their data, its limits."""
    spec = model.spec
    strategy = parse_strategy(cfg.strategy)
    split = run.split()
    data_name = Path(split["data"]).name or split["data"]
    val_count = len(split["val_ids"])
    records = run.metrics(missing_ok=True)
    kept = run.kept_record() if records else None
    epochs_run = records[-1]["epoch"] if records else 0  # fractional after an early stop within an epoch
    trained_on = datetime.fromtimestamp((run / RunDir.WEIGHTS).stat().st_mtime, timezone.utc).date().isoformat()
    seen = {
        "native": "the 64x64 photo as it is",
        "upscale": f"the 64x64 photo enlarged to {strategy.input_size}x{strategy.input_size} ({spec.upscale_filter})",
        "hr-downscale": f"the photo resized to {strategy.input_size}x{strategy.input_size}; trained on the 256x256 "
        "twins shrunk to that size",
    }[strategy.kind]
    if kept is not None:
        which, figure = {
            "best": ("best validation macro-F1", "is slightly optimistic"),
            "last": ("last validation", "was not chosen on these images"),
        }[cfg.keep]
        metrics = (
            "| data | images | macro-F1 | accuracy |\n|---|---|---|---|\n"
            f"| validation split of `{data_name}` (held out of training: {cfg.val_fraction:.0%}, seed "
            f"{cfg.split_seed_used}; kept epoch {kept['epoch']:g}) "
            f"| {val_count} | {kept['val_macro_f1']:.4f} | {kept.get('val_accuracy', math.nan):.4f} |\n\n"
            "The validation images come from the same collection as the training images; the weights are those of the "
            f"{which} (`keep: {cfg.keep}`), so this figure {figure}. Score a test set with "
            "`lowres-birds evaluate --run RUN --data IMAGEFOLDER` (labelled folders) or `lowres-birds predict` + "
            "`lowres-birds evaluate --submission` (competition layout)."
        )
    else:
        metrics = "No finished epoch is recorded in the run folder."
    line = distillation_line(cfg, kept["val_macro_f1"]) if kept is not None else None
    distilled = f"- Teacher: {line}.\n" if line else ""
    name, where = run.path.resolve().name, str(out)
    loaders = {
        "timm": (
            'timm:\n\n```python\nimport timm\nmodel = timm.create_model("local-dir:'
            + where
            + '", pretrained=True).eval()\n'
            "config = timm.data.resolve_data_config({}, model=model)  # input size, resize filter, mean and std\n"
            "transform = timm.data.create_transform(**config)\n```\n"
        ),
        "transformers": "",
    }[library]
    examples = ", ".join(labels[:5]) + (f", ... ({len(labels)} in all)" if len(labels) > 5 else "")
    return f"""---
library_name: {library}
pipeline_tag: image-classification
tags:
- image-classification
- birds
- low-resolution
- lowres-birds
---

# {name}: bird species from 64x64 photos

A {len(labels)}-class bird classifier for **low-resolution photos (64x64 pixels)**, trained with lowres-birds
{__version__} on {trained_on}. Backbone: `{spec.source}`{f" (timm's `{timm_architecture(spec.source)}`, ImageNet weights)" if spec.source in OFFLINE_LITE else ""}.
The network sees {seen}; the preprocessing stored with the model does that resize and the normalisation
(mean {list(spec.mean)}, std {list(spec.std)}). Classes: {examples}.

## Use

transformers (offline: nothing is downloaded):

```python
from transformers import pipeline
classify = pipeline("image-classification", model="{where}")
classify("photo.jpg", top_k=5)  # [{{"label": ..., "score": ...}}, ...]
```

{loaders}
lowres-birds:

```python
from lowres_birds import Classifier
Classifier.load("{where}")("photo.jpg", top_k=5)
```

or `lowres-birds predict-image photo.jpg --run {where}`, `lowres-birds predict --images DIR --run {where}`.

## Training

- Data: `{data_name}` ({split["data"]}), {len(labels)} classes; {val_count} images held out for validation, the rest trained on.
- Model: `{cfg.model}`, {"pretrained" if cfg.pretrained else "from scratch"}; strategy `{cfg.strategy}` ({seen}).
- Schedule: {epochs_run:g} of {cfg.epochs} planned epochs, batch {cfg.batch_size}, AdamW lr {cfg.lr:g} ({cfg.schedule}), weight decay {cfg.weight_decay:g}.
{distilled}- The whole resolved recipe:

```yaml
{cfg.to_yaml().strip()}
```

## Metrics

{metrics}

## Intended use

Naming the bird species in small photos (64x64, e.g. crops from camera traps or thumbnails) among the
{len(labels)} species above, and research on low-resolution classification. Not for identifying species
it was not trained on, and not for decisions that need a confirmed identification.

## Limits

- Input: 64x64 RGB photos, as in training. lowres-birds first shrinks larger photos to 64x64 (bicubic);
  transformers' pipeline resizes any photo straight to {spec.input_size}x{spec.input_size}, which matches only for 64x64 input:
  shrink larger photos to 64x64 first.
{unknown_limits(unknown, len(labels))}
- Scores were measured on held-out images of the training collection; photos from other cameras, places
  or seasons may score lower. The training data's terms of use apply to this model.
"""


def unknown_limits(unknown: dict | None, classes: int) -> str:
    """The model card's line on scores: calibrated or not, and what flags a photo as none of the species."""
    if unknown is None:
        return (
            f"- It always answers with one of its {classes} species, also for other birds or for no bird at all; its "
            "scores are not calibrated."
        )
    return (
        f"- Scores are calibrated on the validation split (temperature {unknown['temperature_folded']:.3f}, folded into "
        "the classifier). The pipeline always names one of its "
        f"{classes} species; lowres-birds (`Classifier.load`) also flags a photo as none of them when its "
        f"`{unknown['score']}` score exceeds {unknown['threshold']:.6g} (the threshold that keeps 95 % of the "
        "validation images), which transformers' pipeline does not compute."
    )


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    missing = f"{path} not found; {path.parent} is not a complete Hugging Face folder (write one with lowres-birds export --format hf)"
    data = load_json(path, missing, "export the folder again")
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a JSON object; export the folder again")
    return data


def _weights(folder: Path) -> dict:
    path = folder / WEIGHTS
    missing = f"{path} not found; {folder} is not a complete Hugging Face folder (write one with lowres-birds export --format hf)"
    return load_safetensors(path, missing=missing, damaged="export the folder again")


def load_hf_folder(folder: Path, device: str = "cpu") -> tuple[BirdNet, list[str]]:
    """(BirdNet in eval mode, class names) from a folder written by :func:`write_hf_folder` (or any timm or
    transformers image-classification folder on disk): the same preprocessing as the run it came from."""
    check_device(device)
    folder = Path(folder)
    config = _read_json(folder / CONFIG)
    ours = config.get(OURS) if isinstance(config.get(OURS), dict) else {}
    if "architecture" in config and config.get("model_type", "timm_wrapper") == "timm_wrapper":
        backbone, labels, size, mean, std, source = _timm_backbone(folder, config)
    else:
        backbone, labels, size, mean, std, source = _transformers_backbone(folder, config)
    spec_data = {
        "source": ours.get("source", source),
        "num_classes": len(labels),
        "input_size": size,
        "mean": mean,
        "std": std,
        "resize": ours.get("resize", "pil"),
        "upscale_filter": ours.get("upscale_filter", "bicubic"),
    }
    spec = ModelSpec.from_dict(spec_data, labels, str(folder / CONFIG))
    return BirdNet(backbone, spec).eval().to(device), labels


def _timm_backbone(folder: Path, config: dict) -> tuple[torch.nn.Module, list[str], int, list[float], list[float], str]:
    import timm

    path = folder / CONFIG
    pretrained_cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    labels = check_labels(
        config.get("label_names") or pretrained_cfg.get("label_names"),
        f"{path}: 'label_names'",
        "export the folder again",
    )
    try:
        size = int(pretrained_cfg.get("input_size", [3, 224, 224])[-1])
        mean, std = (
            [float(v) for v in pretrained_cfg.get("mean", (0.485, 0.456, 0.406))],
            [float(v) for v in pretrained_cfg.get("std", (0.229, 0.224, 0.225))],
        )
    except (TypeError, ValueError, IndexError):
        raise UserError(
            f"{path}: 'pretrained_cfg' has a malformed input_size, mean or std; export the folder again"
        ) from None
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise UserError(f"{path}: 'model_args' must be a JSON object of timm arguments; export the folder again")
    model_args = {k: v for k, v in model_args.items() if k != "num_classes"}
    architecture = str(config["architecture"])
    try:
        backbone = timm.create_model(architecture, pretrained=False, num_classes=len(labels), **model_args)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UserError(
            f"{path}: timm cannot build {architecture!r} ({str(exc).splitlines()[0][:120]}); a newer timm may know it"
        ) from None
    # transformers' save_pretrained prefixes them
    weights = {name.removeprefix("timm_model."): tensor for name, tensor in _weights(folder).items()}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(
            f"{folder / WEIGHTS} does not fit {architecture} in {CONFIG} ({str(exc).splitlines()[0][:120]}); export "
            "the folder again"
        ) from None
    return backbone, labels, size, mean, std, f"timm:{architecture}"


def _transformers_backbone(
    folder: Path, config: dict
) -> tuple[torch.nn.Module, list[str], int, list[float], list[float], str]:
    require_extra("hf", f"{folder} (a transformers model)")
    from transformers import AutoModelForImageClassification

    path = folder / CONFIG
    id2label = config.get("id2label")
    try:
        labels = [id2label[key] for key in sorted(id2label, key=int)]
    except (TypeError, ValueError, KeyError, AttributeError):
        raise UserError(f"{path}: 'id2label' must map class indices to names; export the folder again") from None
    processor = _read_json(folder / PROCESSOR) if (folder / PROCESSOR).is_file() else {}
    size = processor.get("size", {})
    try:
        side = int(size.get("height") or size.get("shortest_edge")) if isinstance(size, dict) else int(size)
        mean, std = (
            [float(v) for v in processor.get("image_mean", (0.5,) * 3)],
            [float(v) for v in processor.get("image_std", (0.5,) * 3)],
        )
    except (TypeError, ValueError):
        raise UserError(
            f"{folder / PROCESSOR}: needs 'size' (height) and numeric image_mean/image_std; export the folder again"
        ) from None
    try:
        backbone = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{folder} could not be loaded by transformers ({str(exc).strip().splitlines()[0][:160]}); export the "
            "folder again"
        ) from None
    return backbone, labels, side, mean, std, f"hf:{folder}"
