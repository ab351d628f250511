"""Resolution strategies: the one place that decides what the model sees, for training and prediction alike.

The reference study compared four ways of feeding 64x64 photos to a 224x224 ViT:
``hr-downscale:64`` (train on the 256x256 twins shrunk to 64), ``upscale:256``, ``native`` (64 in,
64 to the model) and ``upscale:224`` (best). A strategy fixes (a) which stored images training reads
(low-res or their high-res twins) and (b) the square size the model receives. Test images are always
low-res; the resize to the model's size happens inside the model wrapper, so train and predict cannot
disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lowres_birds.errors import UserError

LR_SIZE = 64  # the competition's low-res side
HR_SIZE = 256  # the side of the high-res twins
STRATEGY_KINDS = ("native", "upscale", "hr-downscale")


@dataclass(frozen=True)
class Strategy:
    kind: str
    input_size: int

    @property
    def train_source(self) -> str:
        """Which stored images the training split reads: 'lr' (64x64) or 'hr' (256x256 twins)."""
        return "hr" if self.kind == "hr-downscale" else "lr"

    def __str__(self) -> str:
        return "native" if self.kind == "native" else f"{self.kind}:{self.input_size}"


def parse_strategy(text: str) -> Strategy:
    """'native' | 'upscale[:N]' (default 224) | 'hr-downscale[:N]' (default 64)."""
    kind, _, size_text = text.strip().partition(":")
    if kind not in STRATEGY_KINDS:
        raise UserError(f"unknown strategy {text!r}: use native, upscale:N or hr-downscale:N")
    if kind == "native":
        if size_text:
            raise UserError(f"strategy 'native' takes no size (got {text!r}); use upscale:N to resize")
        return Strategy("native", LR_SIZE)
    default = 224 if kind == "upscale" else LR_SIZE
    try:
        size = int(size_text) if size_text else default
    except ValueError:
        raise UserError(f"strategy {text!r}: size must be a whole number of pixels, e.g. {kind}:{default}") from None
    if not 16 <= size <= 1024:
        raise UserError(f"strategy {text!r}: size must be between 16 and 1024 pixels")
    return Strategy(kind, size)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 rows (an array or a read-only memmap slice) -> a writable uint8 NCHW tensor (a copy)."""
    return torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float NCHW in [0, 1] -> NCHW at size x size, bicubic with PIL's kernel (antialias=True), clamped.

    antialias=True selects torch's PIL-compatible bicubic (a=-0.5), so this matches the reference's
    ``PIL.Image.resize(..., BICUBIC)`` to within rounding, in both directions.
    """
    if images.shape[-2:] == (size, size):
        return images
    # .contiguous(): on channels_last input (the NHWC cache's batches, channels_last training) torch's
    # antialiased bicubic takes a generic path about 3x slower than on a contiguous copy.
    resized = F.interpolate(images.contiguous(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 1.0)
