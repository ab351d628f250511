"""Using the high-resolution twins well: HR-derived LR views, an HR teacher, and the loss terms.

The test set has no HR twin, so HR can only help through training:
- ``hr_views``: augment HR crops (flip, crop, RandAugment) and degrade them with the fitted chain, so
  they look like real LR images (no train/test mismatch, unlike the reference's plain resize);
- ``build_teacher``: the pretrained backbone, frozen, sees the HR twins at its native size; a
  logistic-regression head on those features is the teacher (it scores far above any LR model);
- ``kd_loss`` / ``feature_loss``: the LR student learns the teacher's soft labels and, optionally, to
  produce from 64x64 input the features the backbone produces from the 256x256 twin.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lowres_birds.degradation import Degradation, degrade, fit_degradation
from lowres_birds.errors import UserError
from lowres_birds.metrics import score
from lowres_birds.resolution import to_nchw


def hr_views(hr_images: torch.Tensor, degradation: Degradation, crop_scale_min: float, randaugment_ops: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 HR NCHW -> realistic uint8 LR views: per-image flip + crop (+ RandAugment) at HR, then degrade."""
    from torchvision.transforms import v2

    size = hr_images.shape[-1]
    crop = v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), ratio=(0.9, 1.1), antialias=True)
    augment = v2.RandAugment(num_ops=randaugment_ops) if randaugment_ops else None
    views = []
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: seed it from ours
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        for image in hr_images:
            image = crop(image)
            if torch.rand(1) < 0.5:
                image = image.flip(-1)
            views.append(augment(image) if augment is not None else image)
    return degrade(torch.stack(views), degradation)


def _array_fingerprint(*arrays: np.ndarray) -> str:
    """A cheap content key for large cached arrays: shapes plus a strided sample of their bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array[:: max(1, len(array) // 64)]).tobytes())
    return digest.hexdigest()[:20]


def fitted_degradation(hr_images: np.ndarray, lr_images: np.ndarray) -> tuple[Degradation, dict]:
    """fit_degradation, cached beside the decoded images (the fit is a grid search over 108 chains)."""
    import json

    from lowres_birds.data import cache_dir

    cache = cache_dir() / f"degradation-{_array_fingerprint(hr_images, lr_images)}.json"
    if cache.exists():
        data = json.loads(cache.read_text(encoding="utf-8"))
        return Degradation.load(cache), {k: v for k, v in data.items() if k not in ("filter", "blur_sigma", "jpeg_quality")}
    model, report = fit_degradation(hr_images, lr_images)
    cache.parent.mkdir(parents=True, exist_ok=True)
    model.save(cache, **report)
    return model, report


@dataclass
class TeacherTargets:
    """Per training-set index: the frozen backbone's pooled HR features and the HR teacher's logits."""

    features: torch.Tensor  # N x D
    logits: torch.Tensor  # N x C
    val_macro_f1: float  # the teacher's own score on the validation HR twins


def pooled_features(model, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """BirdNet (timm backbone) -> pooled pre-logit features for uint8 NHWC images, no grad."""
    outputs = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            outputs.append(model(to_nchw(images[start : start + batch_size]), return_features=True)[0].float())
    return torch.cat(outputs)


def build_teacher(source: str, labels: list[str], hr_images: np.ndarray, targets: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, input_size: int) -> TeacherTargets:
    """Frozen pretrained backbone on HR at ``input_size`` + logistic regression fitted on the training split.

    Features are cached beside the decoded images, so ablations and folds compute them once.
    """
    from sklearn.linear_model import LogisticRegression

    from lowres_birds.data import cache_dir
    from lowres_birds.models import create_model

    key = hashlib.sha256(f"{source}|{input_size}|{_array_fingerprint(hr_images)}".encode()).hexdigest()[:20]
    cache = cache_dir() / f"teacher-{key}.pt"
    if cache.exists():
        features = torch.load(cache, weights_only=True)
    else:
        model = create_model(source, labels, input_size, pretrained=True)
        features = pooled_features(model, hr_images)
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        torch.save(features, temporary)
        os.replace(temporary, cache)
    head = LogisticRegression(C=0.5, max_iter=300)
    head.fit(features[train_idx].numpy(), targets[train_idx])
    logits = torch.zeros(len(features), len(labels))
    logits[:, head.classes_] = torch.from_numpy(head.decision_function(features.numpy())).float()
    val_f1 = score(targets[val_idx], logits[val_idx].argmax(1).numpy())["macro_f1"]
    return TeacherTargets(features, logits, val_f1)


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term T^2 * KL(teacher || student_T), batch-mean.

    ``teacher_probs`` are already softened (softmax(teacher_logits / T)) so that MixUp/CutMix can mix them.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """MSE to the HR features, relative to their mean square, so the weight does not depend on scale."""
    return F.mse_loss(student_features, teacher_features) / teacher_features.pow(2).mean().clamp_min(1e-8)


def mix_batch(images: torch.Tensor, targets: list[torch.Tensor], mixup_alpha: float, cutmix_alpha: float, generator: torch.Generator):
    """MixUp or CutMix (one chosen per batch, as timm does) applied to images and every per-sample target.

    Unlike timm's Mixup, any number of soft targets (one-hot labels, teacher logits/features) are mixed
    with the same partner and weight, which distillation needs.
    """
    from timm.data.mixup import cutmix_bbox_and_lam

    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    partner = images.flip(0)
    if use_cutmix:
        (top, bottom, left, right), lam = cutmix_bbox_and_lam(images.shape, lam, correct_lam=True)
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    else:
        mixed = (images.float() * lam + partner.float() * (1 - lam)).round().to(images.dtype)
    return mixed, [t * lam + t.flip(0) * (1 - lam) for t in targets]


def hf_layer_decay_groups(model, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise LR decay for a Hugging Face ViT/BEiT: embeddings get lr*d^(L+1), block i lr*d^(L-i), head lr."""
    config = model.backbone.config
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        raise UserError(f"layer_decay needs a ViT-style model with num_hidden_layers, not {model.spec.source}")
    groups: dict[int, list] = {}
    for name, parameter in model.backbone.named_parameters():
        if not parameter.requires_grad:
            continue
        if "embeddings" in name:
            depth = 0
        elif ".layer." in name:
            depth = int(name.split(".layer.")[1].split(".")[0]) + 1
        else:
            depth = layers + 1
        groups.setdefault(depth, []).append(parameter)
    return [
        {"params": params, "lr": lr * layer_decay ** (layers + 1 - depth), "weight_decay": weight_decay}
        for depth, params in sorted(groups.items())
    ]


def fold_indices(targets: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of fold ``fold`` of a stratified K-fold split fixed by seed."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(targets).min())
    if smallest < folds:
        raise UserError(f"--folds {folds} needs at least {folds} images in every class (the smallest has {smallest})")
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(targets)), targets))
    train_idx, val_idx = splits[fold]
    return np.sort(train_idx), np.sort(val_idx)

