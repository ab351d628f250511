"""How the 64x64 images were made from their 256x256 twins, fitted from the pairs themselves.

The reference trained on HR images shrunk with a plain resize and lost accuracy (0.72 vs 0.85): the
shrunk HR did not look like the real LR. Here a small grid search over the usual camera/codec chain
(Gaussian pre-blur -> resampling filter -> JPEG quality) finds the chain whose output is closest to the
real LR images (least squares on a subset of pairs). ``degrade`` then turns augmented HR crops into
realistic LR training views on the fly, in batches.
A family of chains drawn per image instead of this one: data/degradations.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowres_birds.config import LR_SIZE
from lowres_birds.data.degradations import jpeg_round_trip
from lowres_birds.data.images import cache_dir
from lowres_birds.errors import UserError
from lowres_birds.model.resolution import to_nchw
from lowres_birds.run_dir import write_json

FILTERS = ("bicubic", "bilinear", "area")
BLUR_SIGMAS = (0.0, 0.5, 0.8, 1.1, 1.4, 1.8)
JPEG_QUALITIES = (0, 95, 90, 80, 70, 55)  # 0 = no JPEG step


@dataclass(frozen=True)
class Degradation:
    """Blur (sigma in HR pixels) -> resample to 64 with ``filter`` -> JPEG at ``jpeg_quality`` (0 = none)."""

    filter: str = "bicubic"
    blur_sigma: float = 0.0
    jpeg_quality: int = 0

    def save(self, path: Path, **report) -> None:
        write_json(path, {**asdict(self), **report})

    @classmethod
    def load(cls, path: Path) -> Degradation:
        """A saved chain, checked: an unknown filter or out-of-range value is refused, naming the file."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = cls(str(data["filter"]), float(data["blur_sigma"]), int(data["jpeg_quality"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is not a degradation chain ({type(exc).__name__}); delete it to refit") from None
        if model.filter not in FILTERS or not 0 <= model.blur_sigma <= 10 or not 0 <= model.jpeg_quality <= 100:
            raise UserError(f"{path} holds an invalid degradation chain; delete it to refit")
        return model


PLAIN_RESIZE = Degradation("bicubic", 0.0, 0)


def degrade(images: torch.Tensor, model: Degradation, size: int = LR_SIZE) -> torch.Tensor:
    """uint8 NCHW HR images -> uint8 NCHW size x size images made the way the real LR ones were."""
    from torchvision.transforms.v2.functional import gaussian_blur

    pixels = images.float() / 255.0
    if model.blur_sigma > 0:
        kernel = 2 * int(np.ceil(3 * model.blur_sigma)) + 1
        pixels = gaussian_blur(pixels, [kernel, kernel], [model.blur_sigma, model.blur_sigma])
    if model.filter == "area":
        pixels = F.interpolate(pixels, size=(size, size), mode="area")
    else:
        pixels = F.interpolate(pixels, size=(size, size), mode=model.filter, antialias=True, align_corners=False)
    small = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    if model.jpeg_quality:
        small = (
            torch.from_numpy(jpeg_round_trip(small.permute(0, 2, 3, 1).cpu().numpy(), model.jpeg_quality))
            .permute(0, 3, 1, 2)
            .to(images.device)
        )
    return small


SSIM_WINDOW = 7  # scikit-image's default: a uniform 7 x 7 window, sample covariances, K1 = 0.01, K2 = 0.03


def psnr_ssim(fake: torch.Tensor, real: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM between two uint8 NCHW batches, as scikit-image's ``peak_signal_noise_ratio`` and
    ``structural_similarity(channel_axis=-1, data_range=255)`` compute them per image (float64, same values)."""
    fake64, real64 = fake.to(torch.float64), real.to(torch.float64)
    mse = ((fake64 - real64) ** 2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(255.0**2 / mse)  # identical images give inf, as scikit-image does

    def local_mean(x: torch.Tensor) -> torch.Tensor:  # the window's mean where it fits whole (skimage crops the rest)
        return F.avg_pool2d(x, SSIM_WINDOW, stride=1)

    covariance = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)
    mean_f, mean_r = local_mean(fake64), local_mean(real64)
    var_f = covariance * (local_mean(fake64 * fake64) - mean_f * mean_f)
    var_r = covariance * (local_mean(real64 * real64) - mean_r * mean_r)
    cov = covariance * (local_mean(fake64 * real64) - mean_f * mean_r)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mean_f * mean_r + c1) * (2 * cov + c2)) / ((mean_f**2 + mean_r**2 + c1) * (var_f + var_r + c2))
    return float(psnr.mean()), float(ssim_map.mean(dim=(1, 2, 3)).mean())


def fit_degradation(
    hr_images: np.ndarray, lr_images: np.ndarray, pairs: int = 256, seed: int = 0
) -> tuple[Degradation, dict]:
    """Grid-search the chain on ``pairs`` training pairs; report PSNR/SSIM on as many held-out pairs.

    Returns the best chain and a report comparing it with a plain bicubic resize on the held-out pairs.
    """
    rng = np.random.default_rng(seed)
    pairs = min(pairs, len(hr_images) // 2)
    chosen = rng.permutation(len(hr_images))[: 2 * pairs]
    fit_idx, held_idx = np.sort(chosen[:pairs]), np.sort(chosen[pairs:])

    hr_fit, lr_fit = to_nchw(hr_images[fit_idx]), to_nchw(lr_images[fit_idx]).float()
    best, best_error = PLAIN_RESIZE, float("inf")
    for filter_name, sigma, quality in itertools.product(FILTERS, BLUR_SIGMAS, JPEG_QUALITIES):
        candidate = Degradation(filter_name, sigma, quality)
        error = float(((degrade(hr_fit, candidate).float() - lr_fit) ** 2).mean())
        if error < best_error:
            best, best_error = candidate, error
    hr_held, lr_held = to_nchw(hr_images[held_idx]), to_nchw(lr_images[held_idx])
    fitted_psnr, fitted_ssim = psnr_ssim(degrade(hr_held, best), lr_held)
    plain_psnr, plain_ssim = psnr_ssim(degrade(hr_held, PLAIN_RESIZE), lr_held)
    report = {
        "fit_pairs": int(len(fit_idx)),
        "held_out_pairs": int(len(held_idx)),
        "fit_mse": best_error,
        "held_out_psnr": fitted_psnr,
        "held_out_ssim": fitted_ssim,
        "plain_resize_psnr": plain_psnr,
        "plain_resize_ssim": plain_ssim,
    }
    return best, report


def array_fingerprint(*arrays: np.ndarray) -> str:
    """A cheap content key for large cached arrays: shapes plus a strided sample of their bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array[:: max(1, len(array) // 64)]).tobytes())
    return digest.hexdigest()[:20]


def fitted_degradation(hr_images: np.ndarray, lr_images: np.ndarray) -> tuple[Degradation, dict]:
    """fit_degradation, cached beside the decoded images (the fit is a grid search over 108 chains)."""
    cache = cache_dir() / f"degradation-{array_fingerprint(hr_images, lr_images)}.json"
    if cache.exists():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            return Degradation.load(cache), {
                k: float(data[k]) for k in data if k not in ("filter", "blur_sigma", "jpeg_quality")
            }
        except (UserError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError):
            pass  # a damaged cache entry is refitted
    model, report = fit_degradation(hr_images, lr_images)
    model.save(cache, **report)
    return model, report
