"""The 1st-place training options: TrivialAugmentWide and RandomErasing per LR image (seeded by the run's generator)
and the class-balanced cross-entropy; all off by default, and a tiny run with all of them finishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lowres_birds.config import RunConfig
from lowres_birds.train.batches import Targets, trivial_augment_and_erase
from lowres_birds.train.data import HRSupport, training_batch
from lowres_birds.train.losses import class_balanced_weights, total_loss


def same_images(count: int = 16) -> torch.Tensor:
    """``count`` copies of one textured 64x64 image, so any difference between them is augmentation."""
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8))
    return image.expand(count, -1, -1, -1).clone()


def augment(images: torch.Tensor, seed: int, trivial: bool, erasing: float) -> torch.Tensor:
    return trivial_augment_and_erase(images, torch.Generator().manual_seed(seed), trivial, erasing)


def test_all_off_by_default_and_then_nothing_is_drawn():
    cfg = RunConfig()
    assert (cfg.trivial_augment, cfg.random_erasing, cfg.class_balanced_beta) == (False, 0.0, 0.0)
    images, generator = same_images(), torch.Generator().manual_seed(1)
    state = generator.get_state()
    out, _ = training_batch(images, torch.zeros(16, dtype=torch.long), torch.arange(16), 3, cfg, generator, HRSupport())
    assert torch.equal(out, images)
    assert torch.equal(generator.get_state(), state)  # runs without the options keep their random stream


def test_trivial_augment_is_per_image_seeded_by_the_generator_and_leaves_the_global_rng():
    images = same_images()
    global_state = torch.get_rng_state()
    first = augment(images, 7, trivial=True, erasing=0.0)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert len({image.numpy().tobytes() for image in first}) > 4  # one op per image, not one per batch
    assert torch.equal(first, augment(images, 7, trivial=True, erasing=0.0))
    assert not torch.equal(first, augment(images, 8, trivial=True, erasing=0.0))


def test_random_erasing_puts_random_pixels_in_a_box_per_image():
    images = same_images()
    erased = augment(images, 3, trivial=False, erasing=1.0)
    changed = (erased != images).any(1)  # N x H x W
    assert changed.flatten(1).any(1).all()  # every image erased with p = 1
    boxes = set()
    for image, mask in zip(erased, changed):
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        boxes.add((int(top), int(bottom), int(left), int(right)))
        box = image[:, top:bottom, left:right]
        assert box.unique().numel() > 50 and box.float().std() > 40  # uniform noise, not a fill and not 0/1/255
    assert len(boxes) > 4
    half = augment(images, 3, trivial=False, erasing=0.5)
    assert 0 < sum(not torch.equal(a, b) for a, b in zip(half, images)) < 16


def test_class_balanced_weights_favour_rare_classes():
    counts = np.array([500, 50, 5, 0])
    weights = class_balanced_weights(counts, 0.99)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0] < weights[1] < weights[2] <= weights[3]
    effective = (1 - 0.99 ** counts[:3]) / (1 - 0.99)
    assert (weights[1] / weights[0]).item() == pytest.approx(effective[0] / effective[1])
    assert torch.allclose(class_balanced_weights(counts, 0.0), torch.ones(4))


def test_class_balanced_loss_weighs_soft_smoothed_targets_and_beta_zero_is_the_old_loss():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    labels = F.one_hot(torch.tensor([0, 0, 0, 1, 2, 2]), 3).float()
    mixed = Targets(labels * 0.7 + labels.flip(0) * 0.3)
    cfg = RunConfig(label_smoothing=0.05)
    plain = F.cross_entropy(logits, mixed.labels, label_smoothing=0.05)
    assert torch.equal(total_loss(logits, None, mixed, cfg), plain)
    weights = class_balanced_weights(np.array([3, 1, 2]), 0.9)
    weighted = total_loss(logits, None, mixed, cfg, weights)
    expected = -(weights * ((1 - 0.05) * mixed.labels + 0.05 / 3) * logits.log_softmax(-1)).sum(1).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    assert weighted.item() != pytest.approx(plain.item())


def test_a_run_with_all_winner_options_finishes_and_records_them(winners_run):
    config = yaml.safe_load((winners_run / "config.yaml").read_text())
    assert {k: config[k] for k in ("trivial_augment", "random_erasing", "class_balanced_beta", "upscale_filter")} == {
        "trivial_augment": True,
        "random_erasing": 0.5,
        "class_balanced_beta": 0.99,
        "upscale_filter": "lanczos",
    }
    assert (winners_run / "model.safetensors").is_file() and (winners_run / "metrics.jsonl").read_text().count(
        "\n"
    ) == 1
