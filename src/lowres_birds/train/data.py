"""What a run trains on: the decoded arrays and split, the HR support (degradation, teacher), and the
step from a gathered batch to augmented images with their named targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowres_birds.config import HR_SIZE, LR_SIZE, RunConfig, parse_strategy
from lowres_birds.data.images import load_images
from lowres_birds.data.splits import fold_indices, stratified_split
from lowres_birds.data.tables import ImageTable, LabelMap, load_train_table
from lowres_birds.errors import UserError
from lowres_birds.model.resolution import gather_nchw
from lowres_birds.train.batches import Targets, hr_views, mix_batch, random_crop_flip
from lowres_birds.train.degradation import Degradation, fitted_degradation
from lowres_birds.train.teacher import TeacherTargets, build_teacher


@dataclass
class TrainingData:
    """Decoded arrays and the split, shared by train and report."""

    table: ImageTable
    label_map: LabelMap
    targets: np.ndarray
    lr_images: np.ndarray
    train_images: np.ndarray  # LR or HR, by strategy
    train_idx: np.ndarray
    val_idx: np.ndarray
    hr_images: np.ndarray | None  # the 256x256 twins, when the strategy or the HR techniques need them


def uses_hr_twins(cfg: RunConfig) -> bool:
    return cfg.hr_view_ratio > 0 or cfg.kd_weight > 0 or cfg.feature_kd_weight > 0


def load_training_data(data_dir: Path, cfg: RunConfig) -> TrainingData:
    """Decode (or read from cache) what the run needs; the split is the hold-out or fold ``cfg.fold``."""
    strategy = parse_strategy(cfg.strategy)
    table = load_train_table(data_dir)
    label_map = LabelMap.fit(table.labels)
    targets = label_map.encode(table.labels)
    if cfg.folds:
        train_idx, val_idx = fold_indices(targets, cfg.folds, cfg.fold, cfg.seed)
    else:
        train_idx, val_idx = stratified_split(targets, cfg.val_fraction, cfg.seed)
    lr_images = load_images(table.lr_paths, LR_SIZE)
    hr_images = None
    if strategy.train_source == "hr" or uses_hr_twins(cfg):
        if table.hr_paths is None:
            raise UserError(f"{cfg.strategy} / the HR techniques need the high-res twins, but {table.hr_missing}")
        hr_images = load_images(table.hr_paths, HR_SIZE)
    train_images = hr_images if strategy.train_source == "hr" else lr_images
    return TrainingData(table, label_map, targets, lr_images, train_images, train_idx, val_idx, hr_images)


@dataclass
class HRSupport:
    """What the high-res twins add to each training step; absent parts are off."""

    hr_images: np.ndarray | None = None
    degradation: Degradation | None = None
    degradation_report: dict | None = None
    teacher: TeacherTargets | None = None


def hr_support(cfg: RunConfig, data: TrainingData) -> HRSupport:
    """Fit the degradation and build the HR teacher when the recipe asks for them (cached across runs)."""
    support = HRSupport(hr_images=data.hr_images)
    if cfg.hr_view_ratio > 0:
        support.degradation, support.degradation_report = fitted_degradation(data.hr_images, data.lr_images)
    if cfg.kd_weight > 0 or cfg.feature_kd_weight > 0:
        labels = list(data.label_map.classes)
        support.teacher = build_teacher(cfg.model, labels, data.hr_images, data.targets, data.train_idx, data.val_idx, cfg.teacher_size, cfg.pretrained)
    return support


def training_batch(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, num_classes: int, cfg: RunConfig,
                   generator: torch.Generator, hr: HRSupport) -> tuple[torch.Tensor, Targets]:
    """Augment (LR crops/flips, HR-derived views), attach the teacher's targets, then mix."""
    images = random_crop_flip(images, generator, cfg.crop_scale_min, cfg.hflip)
    if hr.degradation is not None:
        chosen = torch.rand(len(images), generator=generator) < cfg.hr_view_ratio
        if chosen.any():
            hr_batch = gather_nchw(hr.hr_images, indices[chosen].numpy())
            images = images.clone()
            images[chosen.to(images.device)] = hr_views(hr_batch, hr.degradation, cfg.crop_scale_min, cfg.randaugment_ops, generator).to(images.device)
    targets = Targets(F.one_hot(labels, num_classes).float())
    if hr.teacher is not None:
        rows = indices.to(hr.teacher.logits.device)
        targets.teacher_probs = F.softmax(hr.teacher.logits[rows] / cfg.kd_temperature, dim=-1).to(images.device)
        targets.teacher_features = hr.teacher.features[rows].to(images.device)
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        images, targets = mix_batch(images, targets, cfg.mixup_alpha, cfg.cutmix_alpha, generator)
    return images, targets
