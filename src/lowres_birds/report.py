"""Look after training: curves, confusion matrix, per-class F1, the most confidently wrong validation
images with Grad-CAM, the resolved config and timings, as PNGs plus one offline HTML page in RUN/report/.

The validation images are the run's own held-out split (split.json), scored with its best weights, so
the page shows the model that ``predict`` would use.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np

from lowres_birds.errors import UserError
from lowres_birds.reports import Section, write_page
from lowres_birds.resolution import to_nchw

CONFIDENT_ERRORS = 12


def read_metrics(run_dir: Path):
    """metrics.jsonl (one record per finished epoch) as a DataFrame."""
    import pandas as pd

    from lowres_birds.training import METRICS

    path = Path(run_dir) / METRICS
    if not path.is_file() or path.stat().st_size == 0:
        raise UserError(f"{run_dir} has no {METRICS} with a finished epoch; pass a training run folder (--run)")
    return pd.read_json(path, lines=True)


def curves_png(metrics, path: Path) -> Path:
    """Loss, validation macro-F1, accuracy and learning rate per epoch."""
    from lowres_birds.plots import pyplot

    plt = pyplot()
    panels = [("train_loss", "training loss"), ("val_macro_f1", "validation macro-F1"), ("val_accuracy", "validation accuracy"), ("lr", "learning rate (epoch end)")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, (column, title) in zip(axes, panels):
        ax.plot(metrics["epoch"], metrics[column], marker="o")
        ax.set_title(title, fontsize=10)
        if column.startswith("val_"):
            ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def validation_images(run_dir: Path, data_dir: Path, labels: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, uint8 N x 64 x 64 x 3 images, true class indices) of the run's validation split."""
    from lowres_birds.data import LabelMap, load_images, load_train_table
    from lowres_birds.resolution import LR_SIZE

    split_path = run_dir / "split.json"
    if not split_path.is_file():
        raise UserError(f"{run_dir} has no split.json; pass a run folder written by lowres-birds train")
    val_ids = json.loads(split_path.read_text(encoding="utf-8"))["val_ids"]
    table = load_train_table(data_dir)
    position = {image_id: i for i, image_id in enumerate(table.ids)}
    missing = [i for i in val_ids if i not in position]
    if missing:
        raise UserError(f"{data_dir} lacks {len(missing)} validation id(s) of {run_dir} (first: {missing[0]}); pass the data folder the run was trained on (--data)")
    rows = np.array([position[i] for i in val_ids])
    truth = [table.labels[i] for i in rows]
    unknown = sorted(set(truth) - set(labels))
    if unknown:
        raise UserError(f"{data_dir} labels validation images {unknown[0]!r}, a class {run_dir} was not trained on; pass the run's data folder")
    return val_ids, np.asarray(load_images(table.lr_paths, LR_SIZE)[rows]), LabelMap(tuple(labels)).encode(truth)


def predict_probabilities(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import torch

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            outputs.append(model(to_nchw(images[start : start + batch_size])).float().softmax(-1).numpy())
    return np.concatenate(outputs)


def tokens_to_map(tensor):
    """Transformer activations -> B x C x H x W for Grad-CAM: B x N x C tokens (class/register tokens
    first) become a square grid; B x H x W x C maps (Swin) are permuted."""
    if tensor.ndim == 4:
        return tensor.permute(0, 3, 1, 2)
    side = math.isqrt(tensor.shape[1])
    patches = tensor[:, tensor.shape[1] - side * side :]
    return patches.reshape(tensor.shape[0], side, side, tensor.shape[2]).permute(0, 3, 1, 2)


def cam_target(backbone):
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


def grad_cam_overlays(model, images: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
    """Grad-CAM heat maps for the given classes, drawn over the images at the model's input size."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torch import nn

    from lowres_birds.data import fit_square

    class PixelsToLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, pixels):
            return self.net.forward_features(pixels)

    layer, reshape = cam_target(model.backbone)
    pixels = model.preprocess(to_nchw(images)).requires_grad_(True)
    with GradCAM(model=PixelsToLogits().eval(), target_layers=[layer], reshape_transform=reshape) as cam:
        heat = cam(input_tensor=pixels, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    size = model.spec.input_size
    return [show_cam_on_image(fit_square(image, size).astype(np.float32) / 255, h, use_rgb=True) for image, h in zip(images, heat)]


def confident_errors_png(model, images, truth, probs, labels, path: Path, count: int = CONFIDENT_ERRORS) -> tuple[Path | None, int]:
    """Grid of the most confidently wrong images (image | Grad-CAM of the predicted class); (path, errors)."""
    from lowres_birds.plots import image_grid_png

    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != truth)
    if len(wrong) == 0:
        return None, 0
    chosen = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:count]
    overlays = grad_cam_overlays(model, images[chosen], predicted[chosen])
    cells, titles = [], []
    for index, overlay in zip(chosen, overlays):
        cells += [images[index], overlay]
        titles += [f"true: {labels[truth[index]]}", f"pred: {labels[predicted[index]]} ({probs[index, predicted[index]]:.0%})"]
    return image_grid_png(cells, titles, path, columns=min(6, len(cells))), len(wrong)


def write_report(run_dir: Path, data_dir: Path, out_dir: Path | None = None) -> tuple[Path, str]:
    """All figures and report.html for a run; returns (page, short text summary)."""
    import pandas as pd

    from lowres_birds.config import load_run_config
    from lowres_birds.inference import load_run_model
    from lowres_birds.metrics import per_class_table, score
    from lowres_birds.plots import barh_png, confusion_matrix_png

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    metrics = read_metrics(run_dir)
    model, labels = load_run_model(run_dir)
    ids, images, truth = validation_images(run_dir, data_dir, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = predict_probabilities(model, images)
    predicted = probs.argmax(1)
    true_names, predicted_names = [labels[i] for i in truth], [labels[i] for i in predicted]
    scores = score(true_names, predicted_names)
    per_class = per_class_table(true_names, predicted_names, labels).sort_values(["f1", "support"], kind="stable")
    per_class.to_csv(out_dir / "per_class.csv", index=False)
    curves = curves_png(metrics, out_dir / "curves.png")
    matrix = confusion_matrix_png(true_names, predicted_names, labels, out_dir / "confusion_matrix.png", "validation confusion matrix (rows normalised)")
    f1_chart = barh_png(per_class["label"].tolist(), per_class["f1"].tolist(), out_dir / "per_class_f1.png", "validation F1 per class, worst first", "F1", (0, 1))
    errors_png, n_wrong = confident_errors_png(model, images, truth, probs, labels, out_dir / "confident_errors.png")
    config = pd.DataFrame([(k, str(v)) for k, v in load_run_config(run_dir / "config.yaml").to_dict().items()], columns=["key", "value"])
    timings = metrics.assign(epoch_s=metrics["elapsed_s"].diff().fillna(metrics["elapsed_s"]))
    best = metrics.loc[metrics["val_macro_f1"].idxmax()]
    worst = ", ".join(f"{r.label} {r.f1:.2f}" for r in per_class.head(5).itertuples())
    summary = (
        f"run {run_dir}: {len(metrics)} epoch(s) in {metrics['elapsed_s'].iloc[-1]:.0f}s, best epoch {int(best['epoch'])}\n"
        f"validation ({len(ids)} images, best weights): macro-F1 {scores['macro_f1']:.4f}  accuracy {scores['accuracy']:.4f}  "
        f"errors {n_wrong}\nworst classes: {worst}"
    )
    errors_items = [errors_png] if errors_png else ["no validation errors"]
    sections = [
        Section("Summary", [summary]),
        Section("Training curves", [curves]),
        Section("Confusion matrix (validation split)", [matrix]),
        Section("Per-class F1 (validation split)", [f1_chart, per_class]),
        Section(
            f"Most confidently wrong validation images ({min(n_wrong, CONFIDENT_ERRORS)} of {n_wrong} errors)",
            ["Each pair: the 64x64 input, then Grad-CAM of the predicted class at the model's input size.", *errors_items],
        ),
        Section("Resolved config", [config]),
        Section("Timings per epoch", [timings]),
    ]
    page = write_page(out_dir / "report.html", f"Training report: {run_dir.name}", sections)
    return page, summary


def report_after_training(run_dir: Path, data_dir: Path | None) -> None:
    """Called by ``train`` on success: a failed report never fails the training, it warns in one line."""
    from lowres_birds.cli import _run_data_dir

    try:
        page, _ = write_report(run_dir, _run_data_dir(run_dir, data_dir))
        print(f"report: {page}")
    except Exception as exc:  # reporting is a bonus after a successful run
        warnings.warn(f"training report skipped ({type(exc).__name__}: {exc}); run lowres-birds report --run {run_dir}", stacklevel=2)


# --------------------------------------------------------------------------- command line


def add_report(sub) -> None:
    parser = sub.add_parser("report", help="figures and an HTML page for a trained run", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run folder written by lowres-birds train")
    parser.add_argument("--data", type=Path, help="data folder the run was trained on (default: the one in split.json)")
    parser.add_argument("--out", type=Path, help="folder for the figures and report.html (default: RUN/report)")


def run_report(args) -> int:
    from lowres_birds.cli import _run_data_dir

    if not args.run.is_dir():
        raise UserError(f"run folder {args.run} not found")
    page, summary = write_report(args.run, _run_data_dir(args.run, args.data), args.out)
    print(summary)
    print(f"report: {page}")
    return 0
