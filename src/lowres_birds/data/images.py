"""Decoding: any image file to uint8 RGB, each image decoded once and cached.

Decoded images are cached as uint8 ``.npy`` arrays keyed by the file list, sizes and mtimes, so epochs and
later runs never decode a JPEG again; the cache is memory-mapped, not loaded into RAM.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lowres_birds.errors import UserError
from lowres_birds.progress import bar as progress_bar
from lowres_birds.run_dir import atomic_write

DECODE_CHUNK = 1024  # images decoded and written per step (12 MB at 64x64)
# Larger "images" are refused as decompression bombs, by decode_image, before PIL's own (higher) limit; PIL's
# global limit and warning filter are left to the program (the CLI silences the warning: the refusal says it all).
MAX_IMAGE_PIXELS = 40_000_000


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image -> HxWx3 uint8: EXIF rotation applied; grey, palette, RGBA, CMYK and 16-bit handled."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or values.max() > 255 else 1.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(path: Path | BinaryIO, size: int | None = None) -> np.ndarray:
    """Decode one file (or in-memory upload, named by its ``.name``) to HxWx3 uint8, optionally resized to
    size x size (bicubic). Bad files raise UserError."""
    name = getattr(path, "name", "upload") if hasattr(path, "read") else path
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:  # PIL itself only warns up to twice the limit
                raise Image.DecompressionBombError
            image.load()
            array = to_rgb_array(image)
    except Image.DecompressionBombError:
        raise UserError(
            f"{name}: image is larger than {MAX_IMAGE_PIXELS:,} pixels; refused as a decompression bomb"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{name}: not a readable image ({detail}); replace or remove it") from None
    return array if size is None else fit_square(array, size)


def fit_square(array: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size (PIL bicubic, which filters when shrinking); unchanged if already that size."""
    if array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BICUBIC))


def cache_dir() -> Path:
    """$LOWRES_BIRDS_CACHE (unset or empty: ~/.cache/lowres_birds), refused in one line when it is not a folder."""
    value = os.environ.get("LOWRES_BIRDS_CACHE", "").strip()
    path = Path(value) if value else Path.home() / ".cache" / "lowres_birds"
    if path.exists() and not path.is_dir():
        raise UserError(f"LOWRES_BIRDS_CACHE={value!r} is a file, not a folder: point it at a folder, or unset it")
    return path


def _cache_key(paths: list[Path], size: int) -> str:
    digest = hashlib.sha256(f"v1:{size}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def load_images(paths: list[Path], size: int, workers: int = 2) -> np.ndarray:
    """All images as one N x size x size x 3 uint8 array, decoded once and cached on disk (memory-mapped).

    Images whose size differs from ``size`` are resized (one summary warning), so a data set with a few
    odd files still trains.
    """
    cache = cache_dir() / f"images-{_cache_key(paths, size)}.npy"
    if cache.exists():
        try:
            cached = np.load(cache, mmap_mode="r", allow_pickle=False)
            if cached.shape == (len(paths), size, size, 3) and cached.dtype == np.uint8:
                return cached
        except (OSError, ValueError):
            pass
        warnings.warn(f"image cache {cache} was damaged; decoding the images again", stacklevel=2)
    odd_sizes = 0

    def decode(path: Path) -> np.ndarray:
        nonlocal odd_sizes
        array = decode_image(path)
        odd_sizes += array.shape[:2] != (size, size)
        return fit_square(array, size)

    def write(temporary: Path) -> None:
        """Stream the decoded images into the .npy file chunk by chunk: memory stays bounded at any size."""
        with open(temporary, "wb") as handle, ThreadPoolExecutor(max_workers=workers) as pool:
            np.lib.format.write_array_header_2_0(
                handle, {"descr": "|u1", "fortran_order": False, "shape": (len(paths), size, size, 3)}
            )
            bar = progress_bar(None, desc=f"decoding {len(paths)} images", total=len(paths))
            for start in range(0, len(paths), DECODE_CHUNK):
                handle.write(np.stack(list(pool.map(decode, paths[start : start + DECODE_CHUNK]))).tobytes())
                bar.update(min(DECODE_CHUNK, len(paths) - start))
            bar.close()

    atomic_write(cache, write)
    if odd_sizes:
        warnings.warn(
            f"{odd_sizes} of {len(paths)} images were not {size}x{size}; resized to {size}x{size} (bicubic)",
            stacklevel=2,
        )
    return np.load(cache, mmap_mode="r")
