"""The model wrapper: ``BirdNet`` takes uint8 images at their stored size and does the resize to the
strategy's input size and the normalisation itself, so training, prediction, ONNX export and serving share
one preprocessing path. ``ModelSpec`` is what rebuilds it offline (saved as the run's model_spec.json).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from lowres_birds.config import UPSCALE_FILTERS
from lowres_birds.errors import UserError
from lowres_birds.model.resolution import normalise, resize_uint8, to_nchw
from lowres_birds.progress import bar as progress_bar

RESIZES = ("pil",)  # the resize kinds a model_spec.json may name


@dataclass
class ModelSpec:
    """What is needed to rebuild a model offline: its source string, normalisation, input size and resize.

    ``resize``: ``pil`` (8-bit as PIL, :func:`resize_uint8`), the one kind so far, recorded so that another can follow.
    ``upscale_filter``: the resize kernel (``bicubic``, ``lanczos``, ``robidoux-sharp``); files without it are bicubic.
    """

    source: str
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "pil"
    upscale_filter: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, labels: list[str], source: str) -> ModelSpec:
        """A spec read from a run folder, checked field by field (it sizes tensors: never trust it blindly)."""
        data = {"upscale_filter": "bicubic", **data}
        try:
            spec = cls(
                source=str(data["source"]),
                num_classes=int(data["num_classes"]),
                input_size=int(data["input_size"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                resize=str(data["resize"]),
                upscale_filter=str(data["upscale_filter"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"{source}: missing or malformed field ({type(exc).__name__}: {exc}); the run folder is damaged"
            ) from None
        problems = [
            (
                spec.num_classes != len(labels),
                f"num_classes {spec.num_classes} but labels.json lists {len(labels)} classes",
            ),
            (not 16 <= spec.input_size <= 1024, f"input_size {spec.input_size} is outside 16-1024"),
            (len(spec.mean) != 3 or len(spec.std) != 3, "mean and std need 3 values"),
            (
                not all(math.isfinite(v) for v in spec.mean + spec.std) or min(spec.std) <= 0,
                "mean/std must be finite, std positive",
            ),
            (spec.resize not in RESIZES, f"resize {spec.resize!r} is not one of {', '.join(RESIZES)}"),
            (
                spec.upscale_filter not in UPSCALE_FILTERS,
                f"upscale_filter {spec.upscale_filter!r} is not one of {', '.join(UPSCALE_FILTERS)}",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(f"{source}: {message}; the run folder is damaged")
        return spec


class BirdNet(nn.Module):
    """uint8 images (N x 3 x H x W) -> logits. Resize + normalise live here, in the graph."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec

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

    def train(self, mode: bool = True) -> BirdNet:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()  # frozen BatchNorm keeps its ImageNet statistics
        return self

    def enable_grad_checkpointing(self) -> None:
        """Keep only each block's input in the forward pass and recompute the rest in the backward pass: a large
        ViT's activations, not its weights, are what fill a GPU (benchmarks/gpu_memory.py). Same loss and gradients."""
        backbone = self.backbone
        if hasattr(backbone, "set_grad_checkpointing"):  # timm
            try:
                backbone.set_grad_checkpointing(True)
                return
            except AssertionError:  # timm's way of saying a model has no checkpointed forward
                pass
        elif getattr(backbone, "supports_gradient_checkpointing", False):  # transformers
            # activation_checkpointing_enable replaces gradient_checkpointing_enable in transformers 5
            enable = (
                getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
            )
            enable({"use_reentrant": False})
            return
        raise UserError(
            f"grad_checkpointing: {self.spec.source} supports no gradient checkpointing; set --no-grad-checkpointing"
        )

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter-name patterns by depth, for timm's layer-wise learning-rate decay: the timm backbone's own
        matcher, or BEiT/ViT-style ``encoder.layer.N`` (``layers.N`` in transformers 5) groups for Hugging Face
        backbones."""
        own = getattr(self.backbone, "group_matcher", None)
        if own is None:
            return {
                "stem": r"^backbone\.[^.]+\.embeddings",
                "blocks": [
                    (r"^backbone\.[^.]+\.(?:encoder\.layer|layers)\.(\d+)\.", None),
                    (r"^backbone\.[^.]+\.(?:layernorm|pooler)", (99999,)),
                ],
            }

        def prefixed(pattern: str) -> str:
            return re.sub(r"\^", r"^backbone\\.", pattern)

        return {
            group: prefixed(rule) if isinstance(rule, str) else [(prefixed(pattern), order) for pattern, order in rule]
            for group, rule in own(coarse=coarse).items()
        }

    def no_weight_decay(self) -> set[str]:
        """The backbone's parameters exempt from weight decay (position embeddings, class tokens)."""
        names = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in (names() if names else ())}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW at any size -> normalised float NCHW at the model's input size."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise UserError(
                f"the model takes uint8 images N x 3 x H x W (0-255), got {str(images.dtype).removeprefix('torch.')} "
                f"{tuple(images.shape)}; use Classifier for files, PIL images or float arrays"
            )
        return normalise(
            resize_uint8(images, self.spec.input_size, self.spec.upscale_filter), self.spec.mean, self.spec.std
        )

    @property
    def feature_width(self) -> int | None:
        """Width of the pooled features ``forward(..., return_features=True)`` returns (timm backbones), else None."""
        return getattr(self.backbone, "num_features", None) if hasattr(self.backbone, "forward_head") else None

    def forward(
        self, images: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> logits, or (pooled features, logits) for feature distillation (timm backbones).

        Features go through forward() rather than a separate method so DDP still syncs their gradients.
        """
        pixels = self.preprocess(images)
        if not return_features:
            return self.classify_pixels(pixels)
        backbone = self.backbone
        if not hasattr(backbone, "forward_head"):
            raise UserError(f"feature distillation needs a timm backbone, not {self.spec.source}")
        features = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
        return features, backbone.get_classifier()(features)

    def classify_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> logits (for Grad-CAM and callers that preprocess themselves)."""
        output = self.backbone(pixels)
        return output.logits if hasattr(output, "logits") else output


def in_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 64, desc: str | None = None
) -> np.ndarray:
    """The one batched inference loop: uint8 N x H x W x 3 rows (array or memory-mapped cache) -> ``fn`` of
    each NCHW batch under inference mode, as float32 rows of one array. ``desc``: show a progress bar."""
    outputs = []
    shown = progress_bar(desc=desc, total=len(images)) if desc else None
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            outputs.append(torch.as_tensor(fn(to_nchw(images[start : start + batch_size]))).float().cpu().numpy())
            if shown is not None:
                shown.update(len(outputs[-1]))
    if shown is not None:
        shown.close()
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def recompute_batchnorm(model: BirdNet, images: np.ndarray, device: torch.device | str, batch_size: int = 128) -> None:
    """The BatchNorm statistics of ``model``'s training layers (frozen ones keep theirs) recomputed as plain averages
    over uint8 N x H x W x 3 ``images`` and their mirrors, as torch's ``swa_utils.update_bn`` does for averaged
    weights: training leaves the running statistics of its last augmented batches, and a mean of several runs' weights
    (a soup) those of none of its networks. Leaves the model in eval mode."""
    model.train()
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.training]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every batch, not an exponential one
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = to_nchw(images[start : start + batch_size]).to(device)
            model(batch)
            model(batch.flip(-1))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def pooled_outputs(
    model: BirdNet, images: np.ndarray, progress: str | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(pooled features, or None where the backbone has none; logits) of uint8 N x H x W x 3 images, in one pass."""
    if model.feature_width is None:
        return None, torch.from_numpy(in_batches(lambda batch: model(batch.to(device)).float(), images, desc=progress))
    width = model.feature_width
    both = in_batches(
        lambda batch: torch.cat(model(batch.to(device), return_features=True), -1).float(), images, desc=progress
    )
    return torch.from_numpy(both[:, :width]), torch.from_numpy(both[:, width:])
