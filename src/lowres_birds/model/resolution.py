"""The pixel path inside the model: uint8 batches resized as PIL does (8-bit, separable filter) and normalised.

Training, prediction, the ONNX graph and serving all call these through the model wrapper, so every
device and runtime sees the same pixels. Which size the model sees is decided by the strategy (config.py),
which kernel resizes (``bicubic``, ``lanczos``, ``robidoux-sharp``) by the run's ``upscale_filter``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache, partial
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from lowres_birds.config import UPSCALE_FILTERS

_Built = TypeVar("_Built")


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 rows (an array or a read-only memmap slice) -> a writable uint8 NCHW tensor (a copy)."""
    return torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2)


def gather_nchw(images: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """The rows ``indices`` of N x H x W x 3 uint8 ``images`` -> a uint8 NCHW tensor (channels_last in memory).

    Integer-array indexing already copies into a fresh array, so unlike :func:`to_nchw` no second copy is made
    (that copy took ~0.1 ms of a 16-image batch here).
    """
    return torch.from_numpy(np.asarray(images[np.asarray(indices)], dtype=np.uint8)).permute(0, 3, 1, 2)


def resize_uint8(images: torch.Tensor, size: int, upscale_filter: str = "bicubic") -> torch.Tensor:
    """uint8 NCHW -> uint8 NCHW at size x size with PIL's resampler (antialiased, 8-bit between passes).

    ``bicubic`` (PIL's, a=-0.5) on a CPU is torch's AVX2 port of Pillow's resampler (int16 weights), ~6x faster
    than the float kernel and within 2 levels of PIL on <1% of pixels. Elsewhere (GPU, while exporting to ONNX,
    and the other filters everywhere) the same integer arithmetic runs as two float64 matrix products,
    bit-identical to the CPU kernel, so training, prediction and the exported graph see the same pixels on every
    device.
    """
    if images.shape[-2:] == (size, size):
        return images
    if upscale_filter == "bicubic" and images.device.type == "cpu" and not _tracing():
        # The kernel's fast path reads and writes channels_last; NCHW input would be repacked per image.
        pixels = images.contiguous(memory_format=torch.channels_last)
        return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
    return resize_uint8_by_matmul(images, size, upscale_filter)


def resize_uint8_by_matmul(images: torch.Tensor, size: int, upscale_filter: str = "bicubic") -> torch.Tensor:
    """The CPU kernel's arithmetic: horizontal pass, round and clip to 8 bits, vertical pass, round and clip."""
    pixels = images.to(torch.float64)  # integer sums below 2**53: exact
    height, width = images.shape[-2:]
    if width != size:
        weights, precision = _device_constant(_weights_on, width, size, upscale_filter, pixels.device)
        pixels = _fixed_point(pixels @ weights.T, precision)
    if height != size:
        weights, precision = _device_constant(_weights_on, height, size, upscale_filter, pixels.device)
        pixels = _fixed_point(weights @ pixels, precision)
    return pixels.to(torch.uint8)


def _fixed_point(sums: torch.Tensor, precision: int) -> torch.Tensor:
    """(sum + half) >> precision, saturated to 0..255, as the kernel's packus."""
    return torch.floor((sums + 2.0 ** (precision - 1)) * 2.0**-precision).clamp_(0, 255)


def _tracing() -> bool:
    """True while torch.export / torch.compile trace the model: eager-only fast paths and caches step aside."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def _device_constant(cached_builder: Callable[..., _Built], *args: object) -> _Built:
    """``cached_builder(*args)``: an ``lru_cache``d builder of constant tensors on a device (no host-to-device copy
    per step), or its uncached original while tracing, so the tracer captures fresh constants."""
    return cached_builder.__wrapped__(*args) if _tracing() else cached_builder(*args)


@lru_cache(maxsize=64)
def _weights_on(in_size: int, out_size: int, upscale_filter: str, device: torch.device) -> tuple[torch.Tensor, int]:
    weights, precision = resample_weights(in_size, out_size, upscale_filter)
    return torch.from_numpy(weights).to(device), precision


@lru_cache(maxsize=64)
def resample_weights(in_size: int, out_size: int, upscale_filter: str) -> tuple[np.ndarray, int]:
    """(out x in integer weights as float64, precision bits) of Pillow's resampler with ``upscale_filter``.

    Pillow's filter windows (``ImagingResample``: the kernel's support widened by the scale when shrinking),
    normalised, then scaled to fixed point rounding half away from zero: for bicubic to int16 with the most
    fraction bits the largest weight allows, as ATen's ``compute_index_ranges_int16_weights`` (torch's CPU kernel,
    whose fast path bicubic keeps); for the filters torch lacks to Pillow's own 22 bits, so they match PIL.
    """
    kernel, kernel_support = FILTERS[upscale_filter]
    scale = in_size / out_size
    support = kernel_support * scale if scale >= 1.0 else kernel_support
    inverse_scale = 1.0 / scale if scale >= 1.0 else 1.0
    window_limit = math.ceil(support) * 2 + 1
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        count = min(max(min(int(center + support + 0.5), in_size) - first, 0), window_limit)
        window = [kernel((j + first - center + 0.5) * inverse_scale) for j in range(count)]
        total = sum(window)
        if total != 0.0:
            window = [w / total for w in window]
        weights[i, first : first + count] = window
    precision = 0 if upscale_filter == "bicubic" else PILLOW_PRECISION_BITS
    while precision < PILLOW_PRECISION_BITS and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)), precision


def _bicubic(x: float, a: float = -0.5) -> float:
    """Pillow's bicubic (Keys, a = -0.5), written as Pillow and ATen write it so the weights round identically."""
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


def _lanczos(x: float, lobes: float = 3.0) -> float:
    """Pillow's LANCZOS: sinc(x) sinc(x / 3) on [-3, 3) (numpy's sinc is sin(pi x) / (pi x))."""
    return float(np.sinc(x) * np.sinc(x / lobes)) if -lobes <= x < lobes else 0.0


def mitchell_netravali(x: float, b: float, c: float) -> float:
    """The (B, C) family of cubics (Mitchell and Netravali, 1988), support 2."""
    x = abs(x)
    if x < 1.0:
        return ((12 - 9 * b - 6 * c) * x**3 + (-18 + 12 * b + 6 * c) * x**2 + (6 - 2 * b)) / 6
    if x < 2.0:
        return ((-b - 6 * c) * x**3 + (6 * b + 30 * c) * x**2 + (-12 * b - 48 * c) * x + (8 * b + 24 * c)) / 6
    return 0.0


PILLOW_PRECISION_BITS = 22  # Pillow's fixed-point fraction bits for 8-bit images (32 - 8 - 2)
# ImageMagick's RobidouxSharp (Nicolas Robidoux's sharpened cubic): the Mitchell-Netravali B and C it defines.
ROBIDOUX_SHARP_B, ROBIDOUX_SHARP_C = 0.2620145123990142, 0.3689927438004929
FILTERS: dict[
    str, tuple[Callable[[float], float], float]
] = {  # name -> (kernel, support in input pixels when enlarging)
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_lanczos, 3.0),
    "robidoux-sharp": (partial(mitchell_netravali, b=ROBIDOUX_SHARP_B, c=ROBIDOUX_SHARP_C), 2.0),
}
assert tuple(FILTERS) == UPSCALE_FILTERS, "config.UPSCALE_FILTERS and the kernels here must name the same filters"


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NCHW -> float32 (pixel / 255 - mean) / std, keeping the memory format.

    On channels_last batches (what :func:`resize_uint8` returns on a CPU) a per-channel scale broadcast over the
    innermost axis of 3 does not vectorise; viewed as rows of W x 3 values the same affine map runs ~5x faster.
    There the float batch is written once and transformed in place: at 224 px it is 9.6 MB per 16 images, and a
    second buffer of that size costs more than the arithmetic.
    """
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous() and not _tracing():
        rows = images.permute(0, 2, 3, 1)  # N x H x W x 3, contiguous
        width = rows.shape[2]
        scale_row, shift_row = _affine(mean, std, width, images.device)
        pixels = torch.empty(rows.shape, dtype=torch.float32, device=images.device)
        flat = pixels.view(-1, width * 3).copy_(rows.reshape(-1, width * 3))
        torch.addcmul(shift_row, flat, scale_row, out=flat)
        return pixels.permute(0, 3, 1, 2)
    scale, shift = _device_constant(_affine, mean, std, 1, images.device)
    return torch.addcmul(shift.view(1, 3, 1, 1), images.float(), scale.view(1, 3, 1, 1))


@lru_cache(maxsize=16)
def _affine(
    mean: tuple[float, ...], std: tuple[float, ...], repeats: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with pixel * scale + shift == (pixel / 255 - mean) / std per channel, repeated ``repeats``
    times (a channels_last row). Cached: building them per batch costs ~0.15 ms of small ops on a CPU."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device)
    return scale.repeat(repeats), shift.repeat(repeats)
