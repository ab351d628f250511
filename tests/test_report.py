"""report: figures and page of a trained run; Grad-CAM layers for convnets and ViTs; never fails a training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from lowres_birds.cli import main
from lowres_birds.inspect.report import cam_target, grad_cam_overlays, report_after_training
from lowres_birds.model.factory import create_model

FIGURES = ("curves.png", "confusion_matrix.png", "per_class_f1.png", "reliability.png", "risk_coverage.png")


def test_train_writes_the_report_automatically(trained_run):
    page = trained_run / "report" / "report.html"
    assert page.is_file()
    for name in FIGURES:
        assert (trained_run / "report" / name).stat().st_size > 1000


def test_report_command_scores_the_best_weights_on_the_run_split(trained_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", "--run", str(trained_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    best = max(json.loads(line)["val_macro_f1"] for line in (trained_run / "metrics.jsonl").read_text().splitlines())
    assert f"macro-F1 {best:.4f}" in printed
    per_class = pd.read_csv(out / "per_class.csv")
    assert sorted(per_class["label"]) == json.loads((trained_run / "labels.json").read_text())
    assert per_class["f1"].is_monotonic_increasing  # worst first
    assert per_class["support"].sum() == len(json.loads((trained_run / "split.json").read_text())["val_ids"])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= len(FIGURES)
    assert "Resolved config" in page and "Timings per validation" in page and "<script" not in page
    assert "Calibration and abstaining" in page and "ECE (15 bins)" in page


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_report_refuses_data_without_the_run_validation_images(trained_run, demo_data, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(demo_data, other)
    frame = pd.read_csv(other / "train.csv")
    frame["id"] = "X" + frame["id"]
    frame.to_csv(other / "train.csv", index=False)
    assert main(["report", "--run", str(trained_run), "--data", str(other), "--out", str(tmp_path / "r")]) == 2
    assert "validation id" in capsys.readouterr().err


def test_a_failing_report_only_warns(tmp_path):
    with pytest.warns(UserWarning, match="training report skipped"):
        report_after_training(tmp_path, tmp_path)


def _images(count: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (count, 64, 64, 3), dtype=np.uint8)


def test_grad_cam_uses_the_last_convolution_of_a_convnet():
    model = create_model("efficientnet_lite0", ["a", "b"], 64, pretrained=False).eval()
    layer, reshape = cam_target(model.backbone)
    assert layer is model.backbone.conv_head and reshape is None
    overlays = grad_cam_overlays(model, _images(), np.array([0, 1]))
    assert [o.shape for o in overlays] == [(64, 64, 3)] * 2


def test_grad_cam_on_a_timm_vit_maps_tokens_back_to_a_grid():
    model = create_model("timm:vit_tiny_patch16_224", ["a", "b"], 224, pretrained=False).eval()
    layer, reshape = cam_target(model.backbone)
    assert layer is model.backbone.blocks[-1].norm1 and reshape is not None
    overlays = grad_cam_overlays(model, _images(1), np.array([1]))
    assert overlays[0].shape == (224, 224, 3)


def test_grad_cam_on_a_hugging_face_vit(tmp_path):
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    ).save_pretrained(tmp_path)
    model = create_model(f"hf:{tmp_path}", ["a", "b"], 32, pretrained=False).eval()
    layer, _ = cam_target(model.backbone)
    assert layer is [m for n, m in model.backbone.named_modules() if n.endswith("layernorm_before")][-1]
    assert grad_cam_overlays(model, _images(1), np.array([0]))[0].shape == (32, 32, 3)


def test_report_and_eda_overwrite_only_their_own_earlier_files(trained_run, demo_data, tmp_path, capsys):
    """evaluate, report and eda may share a folder; report wrote its per_class.csv over evaluate's without a word."""
    from lowres_birds.inspect.eda import EDA_FILES
    from lowres_birds.inspect.report import REPORT_FILES

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "per_class.csv").write_text("evaluate's table")
    assert main(["report", "--run", str(trained_run), "--out", str(shared)]) == 2
    assert "per_class.csv already exists" in capsys.readouterr().err
    assert (shared / "per_class.csv").read_text() == "evaluate's table"
    assert main(["report", "--run", str(trained_run), "--out", str(shared), "--force"]) == 0
    assert main(["report", "--run", str(trained_run), "--out", str(shared)]) == 0  # its own earlier report
    assert {path.name for path in shared.iterdir()} <= set(REPORT_FILES)  # the list the check reads is complete
    eda = tmp_path / "eda"
    eda.mkdir()
    (eda / "samples.png").write_text("mine")
    assert main(["eda", "--data", str(demo_data), "--out", str(eda)]) == 2
    assert main(["eda", "--data", str(demo_data), "--out", str(eda), "--force"]) == 0
    assert main(["eda", "--data", str(demo_data), "--out", str(eda)]) == 0
    assert {path.name for path in eda.iterdir()} <= set(EDA_FILES)
