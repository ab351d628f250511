"""What a run trains on: the decoded arrays and split, the HR support (degradation, teacher), and the
step from a gathered batch to augmented images with their named targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowres_birds.config import HR_SIZE, LR_SIZE, DegradationFamily, RunConfig, parse_degradations, parse_strategy
from lowres_birds.data.degradations import LR_ONLY_FAMILY, degrade_randomly
from lowres_birds.data.images import load_images
from lowres_birds.data.splits import fold_indices, stratified_split
from lowres_birds.data.tables import ImageTable, LabelMap, find_images, load_train_table
from lowres_birds.errors import UserError
from lowres_birds.model.resolution import gather_nchw
from lowres_birds.train.batches import Targets, hr_views, mix_batch, random_crop_flip, trivial_augment_and_erase
from lowres_birds.train.degradation import Degradation, fitted_degradation


@dataclass
class TrainingData:
    """A run's decoded arrays and its split (the hold-out or one fold), as training reads them."""

    table: ImageTable
    label_map: LabelMap
    targets: np.ndarray
    lr_images: np.ndarray
    train_images: np.ndarray  # LR or HR, by strategy
    train_idx: np.ndarray
    val_idx: np.ndarray
    hr_images: np.ndarray | None  # the 256x256 twins, when the strategy or the HR techniques need them

    @property
    def unlabelled_idx(self) -> np.ndarray:
        """The rows after the table's: --distill-images' photos, in training only, labelled by the distilled models
        (-1 until then)."""
        return np.arange(len(self.table), len(self.targets))


def uses_teacher(cfg: RunConfig) -> bool:
    return cfg.kd_weight > 0 or cfg.feature_kd_weight > 0


def uses_hr_twins(cfg: RunConfig) -> bool:
    """HR views, or an HR teacher (a student distilled from trained models needs no twins)."""
    return cfg.hr_view_ratio > 0 or (uses_teacher(cfg) and not cfg.distill_from)


def without_missing_twins(cfg: RunConfig, table: ImageTable) -> tuple[RunConfig, str | None]:
    """(the config the data allows, a one-line notice or None): data without high-res twins (an ImageFolder, a
    test-only copy) trains the recipe without its HR teacher and HR views rather than failing. A student of
    --distill-from keeps its teacher: the distilled models answer the low-res images."""
    if table.hr_paths is not None or not uses_hr_twins(cfg):
        return cfg, None
    no_teacher = {} if cfg.distill_from else {"teacher": "frozen", "kd_weight": 0.0, "feature_kd_weight": 0.0}
    missing = f"no high-res twins ({table.hr_missing}): "
    if parse_degradations(cfg.degradations) is not None:
        notice = (
            f"{missing}{'' if cfg.distill_from else 'training without the HR teacher; '}instead of HR views, "
            f"{cfg.hr_view_ratio:g} of each batch are LR images mildly blurred or compressed ({LR_ONLY_FAMILY})"
        )
        return dataclasses.replace(cfg, **no_teacher), notice
    notice = f"{missing}training without {'HR views' if cfg.distill_from else 'the HR teacher and HR views'}"
    return dataclasses.replace(cfg, **no_teacher, hr_view_ratio=0.0), notice


def load_training_data(data_dir: Path, cfg: RunConfig) -> TrainingData:
    """Decode (or read from cache) what the run needs; the split is the hold-out or fold ``cfg.fold``. The twins
    are loaded when the strategy or the HR techniques use them and the data has them."""
    strategy = parse_strategy(cfg.strategy)
    table = load_train_table(data_dir)
    label_map = LabelMap.fit(table.labels)
    targets = label_map.encode(table.labels)
    if cfg.folds:
        train_idx, val_idx = fold_indices(targets, cfg.folds, cfg.fold, cfg.split_seed_used)
    else:
        train_idx, val_idx = stratified_split(targets, cfg.val_fraction, cfg.split_seed_used)
    lr_images = load_images(table.lr_paths, LR_SIZE)
    hr_images = None
    if strategy.train_source == "hr" and table.hr_paths is None:
        raise UserError(f"{cfg.strategy} trains on the high-res twins, but {table.hr_missing}")
    if (strategy.train_source == "hr" or uses_hr_twins(cfg)) and table.hr_paths is not None:
        hr_images = load_images(table.hr_paths, HR_SIZE)
    if cfg.distill_images:  # low-res strategies only (RunConfig.validate): these photos have no twins
        photos = load_images(find_images(cfg.distill_images), LR_SIZE)
        train_idx = np.concatenate([train_idx, np.arange(len(lr_images), len(lr_images) + len(photos))])
        lr_images = np.concatenate([lr_images, photos])
        targets = np.concatenate([targets, np.full(len(photos), -1, dtype=targets.dtype)])
    train_images = hr_images if strategy.train_source == "hr" else lr_images
    return TrainingData(table, label_map, targets, lr_images, train_images, train_idx, val_idx, hr_images)


@dataclass
class TeacherTargets:
    """Per training row, the HR teacher's outputs on the row's HR twin: the distillation targets (teacher.py builds
    them)."""

    features: torch.Tensor | None  # N x D pooled features (None: a teacher without them, distilled models)
    logits: torch.Tensor | None  # N x C (None: models answering online)
    val_macro_f1: float  # the teacher's own score on the validation rows' HR twins
    kind: str  # RunConfig.teacher (frozen or finetuned), or "distilled" (the models of --distill-from)
    description: str  # what the teacher is, for the train header
    seconds: float  # the time the teacher took to build (training included)
    reused: bool = False  # read back from an earlier run of this folder, not built now
    shared_from: Path | None = (
        None  # copied from another run's teacher (an earlier ensemble member): not this run's time
    )
    answer: Callable[[torch.Tensor], torch.Tensor] | None = None  # online: a uint8 NCHW batch -> probabilities


@dataclass
class HRSupport:
    """What the high-res twins add to each training step; absent parts are off."""

    hr_images: np.ndarray | None = None
    degradation: Degradation | None = None
    degradation_report: dict | None = None
    teacher: TeacherTargets | None = None
    family: DegradationFamily | None = None  # --degradations: a chain drawn per view instead of the fitted one


def hr_support(cfg: RunConfig, data: TrainingData, teacher: TeacherTargets | None) -> HRSupport:
    """Fit the degradation when the recipe asks for it (cached across runs), or take --degradations' family (the
    milder LR-only one without twins); ``teacher`` comes from teacher.py."""
    support = HRSupport(hr_images=data.hr_images, teacher=teacher, family=parse_degradations(cfg.degradations))
    if support.family is not None and data.hr_images is None:
        support.family = LR_ONLY_FAMILY
    elif cfg.hr_view_ratio > 0 and support.family is None:
        support.degradation, support.degradation_report = fitted_degradation(data.hr_images, data.lr_images)
    return support


def training_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    num_classes: int,
    cfg: RunConfig,
    generator: torch.Generator,
    hr: HRSupport,
) -> tuple[torch.Tensor, Targets]:
    """Augment (crops/flips, TrivialAugment and erasing of the stored images, HR-derived views), attach the
    teacher's targets, then mix."""
    images = random_crop_flip(images, generator, cfg.crop_scale_min, cfg.hflip)
    images = trivial_augment_and_erase(images, generator, cfg.trivial_augment, cfg.random_erasing)
    if hr.degradation is not None or hr.family is not None:
        chosen = torch.rand(len(images), generator=generator) < cfg.hr_view_ratio
        if hr.hr_images is not None:
            chosen &= indices < len(hr.hr_images)  # --distill-images' photos have no twins: they stay as they are
        if chosen.any():
            images = images.clone()
            if hr.hr_images is None:  # no twins: the chosen LR images themselves, mildly degraded
                views = degrade_randomly(images[chosen.to(images.device)].cpu(), hr.family, generator)
            else:
                hr_batch = gather_nchw(hr.hr_images, indices[chosen].numpy())
                views = hr_views(
                    hr_batch, hr.degradation or hr.family, cfg.crop_scale_min, cfg.randaugment_ops, generator
                )
            images[chosen.to(images.device)] = views.to(images.device)
    targets = Targets(F.one_hot(labels, num_classes).float())
    teacher = hr.teacher
    if teacher is not None and teacher.logits is not None:
        rows = indices.to(teacher.logits.device)
        targets.teacher_probs = F.softmax(teacher.logits[rows] / cfg.kd_temperature, dim=-1).to(images.device)
        if teacher.features is not None:
            targets.teacher_features = teacher.features[rows].to(images.device)
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        images, targets = mix_batch(images, targets, cfg.mixup_alpha, cfg.cutmix_alpha, generator)
    if teacher is not None and teacher.answer is not None:  # online: the models see exactly what the student sees
        probs = teacher.answer(images).float().clamp_min(1e-8)
        targets.teacher_probs = F.softmax(probs.log() / cfg.kd_temperature, dim=-1).to(images.device)
    return images, targets
