"""Look after training: curves, confusion matrix, per-class F1, the most confidently wrong validation
images with Grad-CAM, the resolved config and timings, as PNGs plus one offline HTML page in RUN/report/.

The validation images are the run's own held-out split (split.json), scored with its kept weights, so
the page shows the model that ``predict`` would use.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lowres_birds.data.images import fit_square
from lowres_birds.data.splits import run_split
from lowres_birds.errors import UserError
from lowres_birds.extras import install_command
from lowres_birds.extras import missing as missing_extra
from lowres_birds.extras import require as require_extra
from lowres_birds.inspect.html import Section, write_page
from lowres_birds.inspect.plots import (
    barh_png,
    confusion_matrix_png,
    curves_png,
    image_grid_png,
    reliability_png,
    risk_coverage_png,
)
from lowres_birds.metrics import per_class_table, score
from lowres_birds.model.calibration import (
    KEEP_KNOWN,
    SCORES,
    STATISTICS,
    UNFITTED,
    expected_calibration_error,
    negative_log_likelihood,
)
from lowres_birds.model.ensemble import distillation_line
from lowres_birds.model.factory import load_run_model
from lowres_birds.model.resolution import to_nchw
from lowres_birds.model.wrapper import in_batches
from lowres_birds.progress import working
from lowres_birds.run_dir import RunDir, write_csv

if TYPE_CHECKING:
    import pandas as pd

    from lowres_birds.model.wrapper import BirdNet

CONFIDENT_ERRORS = 12


# Every file write_report puts in its folder (report.html last): what a report may not overwrite without --force.
REPORT_FILES = (
    "per_class.csv", "curves.png", "confusion_matrix.png", "per_class_f1.png", "confident_errors.png",
    "reliability.png", "risk_coverage.png", "report.html",
)  # fmt: skip


def read_metrics(run: RunDir) -> pd.DataFrame:
    """metrics.jsonl (one record per validation) as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(run.metrics())


def validation_images(run: RunDir, data_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, uint8 N x 64 x 64 x 3 images, true class indices) of the run's validation split."""
    split = run_split(run, data_dir)
    return run.split()["val_ids"], split.lr_images(split.val_rows), split.val_targets(run.labels())


def tokens_to_map(tensor: torch.Tensor) -> torch.Tensor:
    """Transformer activations -> B x C x H x W for Grad-CAM: B x N x C tokens (class/register tokens
    first) become a square grid; B x H x W x C maps (Swin) are permuted."""
    if tensor.ndim == 4:
        return tensor.permute(0, 3, 1, 2)
    side = math.isqrt(tensor.shape[1])
    patches = tensor[:, tensor.shape[1] - side * side :]
    return patches.reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)


def cam_target(backbone: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(layer, reshape_transform): for vision transformers (timm or Hugging Face) the last block's
    pre-attention norm, whose tokens still carry position; otherwise the last convolution."""
    from torch import nn

    modules = list(backbone.named_modules())
    if any("patch_embed" in name for name, _ in modules):
        norms = [m for name, m in modules if name.endswith((".norm1", "layernorm_before"))]
        if norms:
            return norms[-1], tokens_to_map
    convolutions = [m for _, m in modules if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise UserError(f"no Grad-CAM layer found in {type(backbone).__name__}")
    return convolutions[-1], None


def grad_cam_overlays(model: BirdNet, images: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
    """Grad-CAM heat maps for the given classes, drawn over the images at the model's input size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torch import nn

    class PixelsToLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.net.classify_pixels(pixels)

    layer, reshape = cam_target(model.backbone)
    pixels = model.preprocess(to_nchw(images)).requires_grad_(True)
    with GradCAM(model=PixelsToLogits().eval(), target_layers=[layer], reshape_transform=reshape) as cam:
        heat = cam(input_tensor=pixels, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    size = model.spec.input_size
    return [
        show_cam_on_image(fit_square(image, size).astype(np.float32) / 255, h, use_rgb=True)
        for image, h in zip(images, heat)
    ]


def confident_errors_png(
    model: BirdNet,
    images: np.ndarray,
    truth: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    path: Path,
    count: int = CONFIDENT_ERRORS,
) -> tuple[Path | None, int]:
    """Grid of the most confidently wrong images (image | Grad-CAM of the predicted class); (path, errors)."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != truth)
    if len(wrong) == 0:
        return None, 0
    chosen = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:count]
    overlays = grad_cam_overlays(model, images[chosen], predicted[chosen])
    cells, titles = [], []
    for index, overlay in zip(chosen, overlays):
        cells += [images[index], overlay]
        titles += [
            f"true: {labels[truth[index]]}",
            f"pred: {labels[predicted[index]]} ({probs[index, predicted[index]]:.0%})",
        ]
    return image_grid_png(cells, titles, path, columns=min(6, len(cells))), len(wrong)


def write_report(run_dir: Path, data_dir: Path, out_dir: Path | None = None) -> tuple[Path, str]:
    """All figures and report.html for a run; returns (page, short text summary)."""
    import pandas as pd

    require_extra("report", "report (Grad-CAM figures)")
    run = RunDir(run_dir).require()
    run_dir = run.path
    out_dir = Path(out_dir or run / RunDir.REPORT)
    cfg = run.config()  # every file of the run is read before any work
    metrics = read_metrics(run)
    model, labels = load_run_model(run_dir)
    calibration = run.calibration(SCORES, STATISTICS, len(labels), model.feature_width)
    ids, images, truth = validation_images(run, data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logits = in_batches(lambda batch: model(batch).float(), images, desc=f"scoring {len(images)} validation images")
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    predicted = probs.argmax(1)
    true_names, predicted_names = [labels[i] for i in truth], [labels[i] for i in predicted]
    scores = score(true_names, predicted_names)
    per_class = per_class_table(true_names, predicted_names, labels).sort_values(["f1", "support"], kind="stable")
    write_csv(out_dir / "per_class.csv", per_class)
    curves = curves_png(metrics, out_dir / "curves.png")
    matrix = confusion_matrix_png(
        true_names,
        predicted_names,
        labels,
        out_dir / "confusion_matrix.png",
        "validation confusion matrix (rows normalised)",
    )
    f1_chart = barh_png(
        per_class["label"].tolist(),
        per_class["f1"].tolist(),
        out_dir / "per_class_f1.png",
        "validation F1 per class, worst first",
        "F1",
        (0, 1),
    )
    with working("Grad-CAM of the most confident errors"):
        errors_png, n_wrong = confident_errors_png(
            model, images, truth, probs, labels, out_dir / "confident_errors.png"
        )
    config = pd.DataFrame([(k, str(v)) for k, v in cfg.to_dict().items()], columns=["key", "value"])
    timings = metrics.assign(since_previous_s=metrics["elapsed_s"].diff().fillna(metrics["elapsed_s"]))
    kept = run.kept_record()
    worst = ", ".join(f"{r.label} {r.f1:.2f}" for r in per_class.head(5).itertuples())
    summary = (
        f"run {run_dir}: {metrics['epoch'].iloc[-1]:g} epoch(s) in {metrics['elapsed_s'].iloc[-1]:.0f}s "
        f"({len(metrics)} validations), "
        f"kept the {cfg.keep} weights (epoch {kept['epoch']:g})\n"
        f"validation ({len(ids)} images, kept weights): macro-F1 {scores['macro_f1']:.4f}  accuracy "
        f"{scores['accuracy']:.4f}  "
        f"errors {n_wrong}\nworst classes: {worst}"
    )
    distilled = distillation_line(cfg, scores["macro_f1"])
    if distilled:
        summary += f"\n{distilled}"
    errors_items = [errors_png] if errors_png else ["no validation errors"]
    sections = [
        Section("Summary", [summary]),
        Section("Training curves", [curves]),
        Section("Confusion matrix (validation split)", [matrix]),
        Section("Per-class F1 (validation split)", [f1_chart, per_class]),
        Section(
            f"Most confidently wrong validation images ({min(n_wrong, CONFIDENT_ERRORS)} of {n_wrong} errors)",
            [
                "Each pair: the 64x64 input, then Grad-CAM of the predicted class at the model's input size.",
                *errors_items,
            ],
        ),
        calibration_section(run, calibration, logits, truth, out_dir),
        Section("Resolved config", [config]),
        Section("Timings per validation", [timings]),
    ]
    page = write_page(out_dir / "report.html", f"Training report: {run_dir.name}", sections)
    return page, summary


def calibration_section(
    run: RunDir, saved: tuple[dict, dict] | None, logits: np.ndarray, truth: np.ndarray, out_dir: Path
) -> Section:
    """Reliability diagram before/after the run's temperature (``saved``: its calibration), ECE and NLL before/after,
    the unknown threshold and the risk-coverage curve (what --min-confidence trades), on the validation split."""
    if saved is None:
        return Section(
            "Calibration",
            [f"Not calibrated (a run from before calibration existed): lowres-birds calibrate --run {run.path}"],
        )
    calibration = saved[0]
    scores = torch.from_numpy(logits)
    before, after = scores.softmax(-1).numpy(), (scores / calibration["temperature"]).softmax(-1).numpy()
    where = "validation split (where T was fitted: test-set figures in BENCHMARKS.md)"
    fitted, kept = f"fitted by NLL on the {len(truth)} validation images", ""
    if calibration.get("unfitted"):
        fitted = f"not fitted ({UNFITTED})"
    if starts := calibration.get("temperature_from"):
        kept = f": the share its starting runs keep at their own, so ~{1 - KEEP_KNOWN:.0%} of new photos are flagged"
        where = "validation split (trained on by the runs it started from: test-set figures in BENCHMARKS.md)"
        fitted = (
            f"the mean of its starting runs' ({', '.join(starts)}), each fitted on its own validation split: they "
            f"trained on this run's; on its {len(truth)} validation images"
        )
    ece = [expected_calibration_error(probs, truth) for probs in (before, after)]
    nll = [negative_log_likelihood(probs, truth) for probs in (before, after)]
    return Section(
        "Calibration and abstaining",
        [
            f"Temperature {calibration['temperature']:.3f}, {fitted}: ECE "
            f"(15 bins) {ece[0]:.4f} -> {ece[1]:.4f}, NLL {nll[0]:.4f} -> {nll[1]:.4f}. "
            f"Unknown: {calibration['score']} score above {calibration['threshold']:.6g} (the threshold that keeps "
            f"{calibration.get('keep_known', KEEP_KNOWN):.1%} of the validation images as known{kept}).",
            reliability_png(
                {"before": (before, truth), "after": (after, truth)},
                out_dir / "reliability.png",
                f"reliability, {where}",
            ),
            risk_coverage_png(after, truth, out_dir / "risk_coverage.png", f"risk-coverage (calibrated), {where}"),
        ],
    )


def after_training(run_dir: Path, data_dir: Path | None, report: bool = True) -> None:
    """What ``train`` writes once a run is trained: its calibration (as ``calibrate``), RUN/hf (as ``export --format
    hf``, calibrated) and, with ``report``, the report. None fails the training: a failure says so in one line, with
    the command that retries it."""
    calibrate_after_training(Path(run_dir), data_dir)
    write_run_hf_folder(Path(run_dir))
    if report:
        report_after_training(run_dir, data_dir)


def calibrate_after_training(run_dir: Path, data_dir: Path | None) -> None:
    """Calibrate a run (or every run of a folds or members folder) once trained; a failure warns in one line."""
    from lowres_birds.predict.calibrate import calibrate, describe

    try:
        for run, calibration in calibrate(run_dir, data_dir):
            print(describe(run, calibration))
    except Exception as exc:  # noqa: BLE001 - the run itself is complete
        warnings.warn(
            f"calibration skipped ({type(exc).__name__}: {exc}); run lowres-birds calibrate --run {run_dir}",
            stacklevel=2,
        )


def write_run_hf_folder(run_dir: Path) -> None:
    """RUN/hf written again from the run (after training, or after ``calibrate`` changed what it folds in); one that
    cannot be written warns in one line: the run itself is complete."""
    from lowres_birds.predict.hf_folder import write_hf_folder

    try:
        folder = write_hf_folder(run_dir, run_dir / RunDir.HF, force=True)
    except UserError as exc:  # the run cannot be written as one (e.g. its upscale filter): the message says why
        print(f"Hugging Face folder skipped: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - the run itself is complete
        warnings.warn(
            f"Hugging Face folder skipped ({type(exc).__name__}: {exc}); run lowres-birds export --format hf --run "
            f"{run_dir}",
            stacklevel=2,
        )
        return
    print(f"Hugging Face folder: {folder} (transformers.pipeline('image-classification', model='{folder}'))")


def report_after_training(run_dir: Path, data_dir: Path | None) -> None:
    """Called by ``train`` on success: a failed report never fails the training, it warns in one line."""
    if missing_extra("report"):
        warnings.warn(
            f"training report skipped: it needs the [report] extra ({install_command('report')}), then run "
            f"lowres-birds report --run {run_dir}",
            stacklevel=2,
        )
        return
    try:
        page, _ = write_report(run_dir, RunDir(run_dir).data_dir(data_dir))
        print(f"report: {page}")
    except Exception as exc:  # noqa: BLE001 - reporting is a bonus after a successful run
        warnings.warn(
            f"training report skipped ({type(exc).__name__}: {exc}); run lowres-birds report --run {run_dir}",
            stacklevel=2,
        )
