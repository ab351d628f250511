"""Randomised degradations: each 64x64 view made from a larger image by its own chain (kernel, blur, noise, JPEG)
drawn from a family (config.DegradationFamily), as the degradation models of BSRGAN / Real-ESRGAN do.

A model that learned the one chain fitted to the real pairs (train/degradation.py) pays for every other one;
training draws its HR views from a family, and the robustness grid (inspect/robustness.py) uses the same code
with point ranges, so both make their images in one way. All in Pillow, per image, in memory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from lowres_birds.config import LR_SIZE, DegradationFamily

PIL_KERNELS = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
# The milder family for data without HR twins: the LR images themselves, a little more blurred or compressed.
LR_ONLY_FAMILY = DegradationFamily(blur=(0.0, 0.5), jpeg=(60, 95))


@dataclass(frozen=True)
class Chain:
    """One drawn degradation: blur sigma (LR pixels) -> resize with ``kernel`` -> noise std -> JPEG (0 = none)."""

    kernel: str
    blur_sigma: float
    noise_std: float
    jpeg_quality: int


def draw_chains(family: DegradationFamily, count: int, generator: torch.Generator) -> list[Chain]:
    """``count`` chains drawn uniformly from ``family``'s kernels and ranges, from ``generator`` alone."""
    kernel_index = torch.randint(0, len(family.kernels), (count,), generator=generator).tolist()
    blur, noise, quality = torch.rand(3, count, generator=generator, dtype=torch.float64).tolist()
    jpeg_low, jpeg_high = family.jpeg or (0, 0)
    return [
        Chain(
            kernel=family.kernels[kernel_index[i]],
            blur_sigma=family.blur[0] + (family.blur[1] - family.blur[0]) * blur[i],
            noise_std=family.noise[0] + (family.noise[1] - family.noise[0]) * noise[i],
            jpeg_quality=min(jpeg_high, jpeg_low + int(quality[i] * (jpeg_high - jpeg_low + 1))),
        )
        for i in range(count)
    ]


def resize_chain(image: Image.Image, chain: Chain, size: int, crop: tuple[int, int, int] | None = None) -> Image.Image:
    """The chain's blur (sigma scaled from LR to the image's pixels) and resize, in Pillow; ``crop`` (top, left,
    side): resize that square of the image alone (Pillow's ``box``: the crop and the kernel in one resample)."""
    top, left, side = crop or (0, 0, image.width)
    if chain.blur_sigma > 0:
        image = image.filter(ImageFilter.GaussianBlur(chain.blur_sigma * side / size))
    box = (left, top, left + side, top + side)
    if (side, side) == (size, size) == image.size:
        return image
    if chain.kernel == "area" and side % size == 0 and side == image.width == image.height:
        return image.reduce(side // size)  # the mean of each block, as OpenCV's INTER_AREA
    return image.resize((size, size), PIL_KERNELS.get(chain.kernel, Image.Resampling.BOX), box=box)


def degrade_randomly(
    images: torch.Tensor,
    family: DegradationFamily,
    generator: torch.Generator,
    size: int = LR_SIZE,
    crops: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """uint8 NCHW images of any side -> uint8 NCHW ``size`` x ``size``, each through its own chain drawn from
    ``family`` (blur -> resize -> noise -> JPEG, Pillow per image: ~5 CPU ms for a 256x256 one); ``crops``: the
    (top, left, side) square of each image to make the view of. Reproducible for a generator state."""
    chains = draw_chains(family, len(images), generator)
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    boxes = crops or [None] * len(chains)
    small = torch.from_numpy(
        np.stack([np.asarray(resize_chain(Image.fromarray(a), c, size, b)) for a, c, b in zip(arrays, chains, boxes)])
    )
    if family.noise[1] > 0:
        noise_std = torch.tensor([c.noise_std for c in chains], dtype=torch.float32).view(-1, 1, 1, 1)
        noise = torch.randn(small.shape, generator=generator) * noise_std
        small = (small.float() + noise).round().clamp(0, 255).to(torch.uint8)
    out = small.numpy()
    for index, chain in enumerate(chains):
        if chain.jpeg_quality:
            out[index] = jpeg_round_trip(out[index : index + 1], chain.jpeg_quality)[0]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


def jpeg_round_trip(images: np.ndarray, quality: int) -> np.ndarray:
    """N x H x W x 3 uint8 -> the same after a JPEG encode/decode at ``quality`` (Pillow, in memory)."""
    out = np.empty_like(images)
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[index] = np.asarray(Image.open(buffer).convert("RGB"))
    return out
