"""Issue 4's building blocks: degradation fit, distillation loss, mixing, folds, probability averaging,
and one tiny end-to-end run with every HR technique switched on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lowres_birds.cli import main
from lowres_birds.data.demo import draw_bird
from lowres_birds.data.splits import fold_indices
from lowres_birds.errors import UserError
from lowres_birds.predict.classifier import Classifier, average_predictions
from lowres_birds.train.batches import Targets, mix_batch
from lowres_birds.train.degradation import PLAIN_RESIZE, Degradation, degrade, fit_degradation
from lowres_birds.train.losses import kd_loss


def test_degradation_fit_recovers_a_planted_blur_and_filter():
    rng = np.random.default_rng(1)
    hr = np.stack([np.asarray(draw_bird(i % 8, rng)) for i in range(48)])
    planted = Degradation("bilinear", 1.1, 0)
    lr = degrade(torch.from_numpy(hr).permute(0, 3, 1, 2), planted).permute(0, 2, 3, 1).numpy()
    fitted, report = fit_degradation(hr, lr, pairs=24)
    assert fitted == planted
    assert report["held_out_pairs"] == 24
    assert report["held_out_psnr"] > report["plain_resize_psnr"] + 3
    assert report["held_out_ssim"] > report["plain_resize_ssim"]


def test_degrade_outputs_uint8_low_res():
    images = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8)
    out = degrade(images, Degradation("area", 0.8, 80))
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 64, 64)
    assert degrade(images, PLAIN_RESIZE).shape == (3, 3, 64, 64)


def test_kd_loss_is_zero_for_the_teacher_itself_and_matches_the_definition():
    teacher = torch.randn(4, 5)
    probs = torch.softmax(teacher / 3.0, dim=-1)
    assert kd_loss(teacher, probs, 3.0).abs() < 1e-6
    student = torch.randn(4, 5, requires_grad=True)
    loss = kd_loss(student, probs, 3.0)
    expected = (probs * (probs.log() - torch.log_softmax(student / 3.0, -1))).sum(-1).mean() * 9
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.grad.abs().sum() > 0


def test_mix_batch_mixes_every_target_with_the_same_partner_and_weight():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    one_hot = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])]
    teacher = torch.softmax(torch.randn(6, 3), -1)
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0)):
        mixed, targets = mix_batch(images, Targets(one_hot, teacher), mixup, cutmix, generator)
        labels, soft = targets.labels, targets.teacher_probs
        assert mixed.shape == images.shape and mixed.dtype == torch.uint8
        torch.testing.assert_close(labels.sum(-1), torch.ones(6))
        # sample 0 is class 0, partner class 2
        lam = labels[0, 0].item() if labels[0, 0] > 0 else 1 - labels[0, 2].item()
        torch.testing.assert_close(soft, teacher * lam + teacher.flip(0) * (1 - lam))


def test_folds_are_disjoint_cover_everything_and_keep_class_balance():
    targets = np.array([0] * 23 + [1] * 11 + [2] * 6)
    seen = []
    for fold in range(5):
        train_idx, val_idx = fold_indices(targets, 5, fold, seed=0)
        assert not set(train_idx) & set(val_idx)
        counts = np.bincount(targets[val_idx], minlength=3)
        assert all(abs(counts[c] - np.sum(targets == c) / 5) <= 1 for c in range(3))
        seen.extend(val_idx)
    assert sorted(seen) == list(range(len(targets)))
    with pytest.raises(UserError, match="at least 7"):
        fold_indices(targets, 7, 0, seed=0)


def test_probability_averaging_over_runs():
    first = Classifier(["a", "b"], lambda x: np.tile([0.9, 0.1], (len(x), 1)), "first", 64)
    second = Classifier(["a", "b"], lambda x: np.tile([0.3, 0.7], (len(x), 1)), "second", 64)
    images = np.zeros((3, 64, 64, 3), np.uint8)
    averaged = average_predictions([first, second], images, tta="none")
    labels, probs = averaged.labels, averaged.probs
    assert labels == ["a", "b"]
    np.testing.assert_allclose(probs, np.tile([0.6, 0.4], (3, 1)), atol=1e-6)
    other = Classifier(["a", "c"], first._predict_fn, "other", 64)
    with pytest.raises(UserError, match="different classes"):
        average_predictions([first, other], images, tta="none")


def test_hr_techniques_and_folds_end_to_end(demo_data, tmp_path, capsys):
    hr_flags = [
        "--model",
        "efficientnet_lite0",
        "--strategy",
        "native",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--hr-view-ratio",
        "0.5",
        "--degradations",
        "none",  # the HR views through the one chain fitted to the pairs
        "--randaugment-ops",
        "1",
        "--kd-weight",
        "0.5",
        "--feature-kd-weight",
        "1",
        "--teacher-size",
        "64",
        "--mixup-alpha",
        "0.2",
        "--cutmix-alpha",
        "1.0",
        "--ema-decay",
        "0.9",
        "--device",
        "cpu",
    ]
    assert main(["train", "--data", str(demo_data), "--out", str(tmp_path / "folds"), *hr_flags, "--folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "HR teacher" in out and "degradation fitted" in out and "out-of-fold macro-F1" in out
    summary = json.loads((tmp_path / "folds" / "oof.json").read_text())
    assert summary["folds"] == 2 and 0 <= summary["oof_macro_f1"] <= 1
    assert json.loads((tmp_path / "folds" / "fold0" / "degradation.json").read_text())["filter"] in (
        "bicubic",
        "bilinear",
        "area",
    )
    submission = tmp_path / "ensemble.csv"
    runs = ["--run", str(tmp_path / "folds" / "fold0"), "--run", str(tmp_path / "folds" / "fold1")]
    assert main(["predict", *runs, "--data", str(demo_data), "--out", str(submission), "--tta", "flip"]) == 0
    assert len(pd.read_csv(submission)) == len(pd.read_csv(demo_data / "test.csv"))
