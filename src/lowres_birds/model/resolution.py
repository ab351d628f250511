"""The pixel path inside the model: uint8 batches resized as PIL does (8-bit bicubic) and normalised.

Training, prediction, the ONNX graph and serving all call these through the model wrapper, so every
device and runtime sees the same pixels. Which size the model sees is decided by the strategy (config.py).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 rows (an array or a read-only memmap slice) -> a writable uint8 NCHW tensor (a copy)."""
    return torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2)


def gather_nchw(images: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """The rows ``indices`` of N x H x W x 3 uint8 ``images`` -> a uint8 NCHW tensor (channels_last in memory).

    Integer-array indexing already copies into a fresh array, so unlike :func:`to_nchw` no second copy is made
    (that copy took ~0.1 ms of a 16-image batch here).
    """
    return torch.from_numpy(np.asarray(images[np.asarray(indices)], dtype=np.uint8)).permute(0, 3, 1, 2)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float NCHW in [0, 1] -> NCHW at size x size, torch's float antialiased bicubic, clamped.

    The resize of runs trained before lowres-birds 0.2 (``resize: float`` in their model_spec.json). It does not
    round to 8 bits between its two passes as PIL does, so it differs from PIL by up to ~10 levels at sharp
    edges; new runs use :func:`resize_uint8`.
    """
    if images.shape[-2:] == (size, size):
        return images
    # .contiguous(): on channels_last input torch's float antialiased bicubic takes a ~3x slower generic path.
    resized = F.interpolate(images.contiguous(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 1.0)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NCHW -> uint8 NCHW at size x size: PIL's bicubic (a=-0.5, antialiased, 8-bit between passes).

    On a CPU this is torch's AVX2 port of Pillow's resampler (int16 weights), ~6x faster than the float kernel
    and within 2 levels of PIL on <1% of pixels. Elsewhere (GPU, and while exporting to ONNX) the same integer
    arithmetic runs as two float64 matrix products, bit-identical to the CPU kernel, so training, prediction and
    the exported graph see the same pixels on every device.
    """
    if images.shape[-2:] == (size, size):
        return images
    if images.device.type == "cpu" and not _tracing():
        # The kernel's fast path reads and writes channels_last; NCHW input would be repacked per image.
        pixels = images.contiguous(memory_format=torch.channels_last)
        return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
    return resize_uint8_by_matmul(images, size)


def resize_uint8_by_matmul(images: torch.Tensor, size: int) -> torch.Tensor:
    """The CPU kernel's arithmetic: horizontal pass, round and clip to 8 bits, vertical pass, round and clip."""
    pixels = images.to(torch.float64)  # integer sums below 2**53: exact
    height, width = images.shape[-2:]
    if width != size:
        weights, precision = _device_constant(_weights_on, width, size, pixels.device)
        pixels = _fixed_point(pixels @ weights.T, precision)
    if height != size:
        weights, precision = _device_constant(_weights_on, height, size, pixels.device)
        pixels = _fixed_point(weights @ pixels, precision)
    return pixels.to(torch.uint8)


def _fixed_point(sums: torch.Tensor, precision: int) -> torch.Tensor:
    """(sum + half) >> precision, saturated to 0..255, as the kernel's packus."""
    return torch.floor((sums + 2.0 ** (precision - 1)) * 2.0**-precision).clamp_(0, 255)


def _tracing() -> bool:
    """True while torch.export / torch.compile trace the model: eager-only fast paths and caches step aside."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def _device_constant(cached_builder, *args):
    """``cached_builder(*args)``: an ``lru_cache``d builder of constant tensors on a device (no host-to-device copy
    per step), or its uncached original while tracing, so the tracer captures fresh constants."""
    return cached_builder.__wrapped__(*args) if _tracing() else cached_builder(*args)


@lru_cache(maxsize=64)
def _weights_on(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    weights, precision = _pil_bicubic_weights(in_size, out_size)
    return torch.from_numpy(weights).to(device), precision


@lru_cache(maxsize=64)
def _pil_bicubic_weights(in_size: int, out_size: int) -> tuple[np.ndarray, int]:
    """(out x in integer weights as float64, precision bits) of torch's uint8 antialiased bicubic.

    Pillow's filter windows (``ImagingResample``), normalised, then scaled to int16 with the most fraction
    bits the largest weight allows, rounding half away from zero, as ATen's ``compute_index_ranges_int16_weights``.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # bicubic's radius of 2, widened when shrinking
    inverse_scale = 1.0 / scale if scale >= 1.0 else 1.0
    window_limit = math.ceil(support) * 2 + 1
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        count = min(max(min(int(center + support + 0.5), in_size) - first, 0), window_limit)
        window = [_bicubic((j + first - center + 0.5) * inverse_scale) for j in range(count)]
        total = sum(window)
        if total != 0.0:
            window = [w / total for w in window]
        weights[i, first : first + count] = window
    largest = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)), precision


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


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
def _affine(mean: tuple[float, ...], std: tuple[float, ...], repeats: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with pixel * scale + shift == (pixel / 255 - mean) / std per channel, repeated ``repeats``
    times (a channels_last row). Cached: building them per batch costs ~0.15 ms of small ops on a CPU."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device)
    return scale.repeat(repeats), shift.repeat(repeats)
