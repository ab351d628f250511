"""Training batches: index loaders over the decoded images, augmentation, HR-derived views and MixUp/CutMix.

Images live in memory (or the memory-mapped cache) as uint8 arrays; a batch is built by indexing and
augmented as uint8 before the model wrapper resizes and normalises it. Every random draw comes from the
run's seeded ``torch.Generator`` (its state is checkpointed), so a resumed run continues identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2  # timm, which every run imports, imports torchvision anyway

from lowres_birds.config import DegradationFamily
from lowres_birds.data.degradations import degrade_randomly
from lowres_birds.model.resolution import gather_nchw
from lowres_birds.train.degradation import Degradation, degrade


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


def make_loader(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch_size: int, seed: int, shuffle: bool
) -> DataLoader:
    return DataLoader(
        ShuffledIndices(indices, seed, shuffle),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=BatchGather(images, labels),
    )


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, crop_scale_min: float, hflip: bool
) -> torch.Tensor:
    """Per-image random flip and square random-resized crop (area share in [crop_scale_min, 1]), uint8 in and out.

    The one crop-and-flip of the project: LR batches and HR views both go through it.
    """
    if hflip:
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    if crop_scale_min < 1.0:
        size = images.shape[-1]
        crops = []
        for image in images:
            top, left, side = crop_box(size, crop_scale_min, generator)
            crops.append(v2.functional.resized_crop(image, top, left, side, side, [size, size], antialias=True))
        images = torch.stack(crops)
    return images


def crop_box(size: int, crop_scale_min: float, generator: torch.Generator) -> tuple[int, int, int]:
    """(top, left, side) of one square random-resized crop of a ``size`` image, area share in [crop_scale_min, 1]."""
    scale = crop_scale_min + (1 - crop_scale_min) * torch.rand(1, generator=generator).item()
    side = max(8, int(round(size * math.sqrt(scale))))
    top, left = torch.randint(0, size - side + 1, (2,), generator=generator).tolist()
    return top, left, side


def per_image(
    transform: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """A torchvision v2 ``transform`` applied to each image of a uint8 NCHW batch on its own (given the batch it
    would draw one operation for all), its random draws seeded from ``generator`` (torchvision draws from the
    global RNG, which is forked here and left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return torch.stack([transform(image) for image in images])


def hr_views(
    hr_images: torch.Tensor,
    degradation: Degradation | DegradationFamily,
    crop_scale_min: float,
    randaugment_ops: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """uint8 HR NCHW -> realistic uint8 LR views: crop + flip (+ RandAugment) at HR, then the fitted degradation
    or, for a family, a chain drawn per view. Without RandAugment a family's views are cropped by the resize itself
    (Pillow's ``box``, the same crop distribution): one resample instead of two, 3x cheaper."""
    if isinstance(degradation, DegradationFamily) and not randaugment_ops:
        flip = torch.rand(len(hr_images), generator=generator) < 0.5
        views = torch.where(flip.view(-1, 1, 1, 1), hr_images.flip(-1), hr_images)
        size = hr_images.shape[-1]
        boxes = [crop_box(size, crop_scale_min, generator) if crop_scale_min < 1 else (0, 0, size) for _ in views]
        return degrade_randomly(views, degradation, generator, crops=boxes)
    views = random_crop_flip(hr_images, generator, crop_scale_min, hflip=True)
    if randaugment_ops:
        views = per_image(v2.RandAugment(num_ops=randaugment_ops), views, generator)
    if isinstance(degradation, DegradationFamily):
        return degrade_randomly(views, degradation, generator)
    return degrade(views, degradation)


def trivial_augment_and_erase(
    images: torch.Tensor, generator: torch.Generator, trivial_augment: bool, erasing_p: float
) -> torch.Tensor:
    """The 1st-place recipe's image augmentation, per uint8 image: TrivialAugmentWide, then RandomErasing with
    probability ``erasing_p`` filling the box with uniform random pixels. Returns ``images`` itself when both are
    off."""
    steps = ([v2.TrivialAugmentWide()] if trivial_augment else []) + (
        [PixelErasing(p=erasing_p)] if erasing_p > 0 else []
    )
    return per_image(v2.Compose(steps), images, generator) if steps else images


class PixelErasing(v2.RandomErasing):
    """torchvision's RandomErasing (box area 2-33 %, aspect 0.3-3.3, as timm's) filled with uniform 0-255 noise.

    Its own ``value="random"`` draws N(0, 1) floats, meant for normalised tensors: cast into a uint8 image they
    are nearly all 0, 1 or 255. timm's ``pixel`` mode is that normal noise after normalisation; in 8-bit pixels
    before it, uniform noise is the plain equivalent.
    """

    def __init__(self, p: float):
        super().__init__(p=p, value="random")

    def make_params(self, flat_inputs: list) -> dict:
        params = super().make_params(flat_inputs)
        if params["v"] is not None:
            params["v"] = torch.randint(0, 256, params["v"].shape, dtype=torch.uint8)
        return params


@dataclass
class Targets:
    """What each image of a batch is trained towards; MixUp/CutMix mix every field with the same partner."""

    labels: torch.Tensor  # N x C one-hot (soft after mixing)
    teacher_probs: torch.Tensor | None = None  # N x C, softened by the KD temperature
    teacher_features: torch.Tensor | None = None  # N x D pooled HR features


def mix_batch(
    images: torch.Tensor, targets: Targets, mixup_alpha: float, cutmix_alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, Targets]:
    """MixUp or CutMix (one chosen per batch, as timm does), partner = the batch reversed, lambda from ``generator``."""
    from timm.data.mixup import cutmix_bbox_and_lam

    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha)) if alpha > 0 else 1.0
    partner = images.flip(0)
    if use_cutmix:
        (top, bottom, left, right), lam = cutmix_bbox_and_lam(images.shape, lam, correct_lam=True)
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    else:
        mixed = (images.float() * lam + partner.float() * (1 - lam)).round().to(images.dtype)
    mixed_targets = {
        spec.name: value * lam + value.flip(0) * (1 - lam)
        for spec in fields(targets)
        if (value := getattr(targets, spec.name)) is not None
    }
    return mixed, replace(targets, **mixed_targets)
