"""Every figure of the project (evaluate, report, eda, study): matplotlib, headless, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowres_birds.run_dir import atomic_write

if TYPE_CHECKING:
    from types import ModuleType

    import pandas as pd
    from matplotlib.figure import Figure

# Private-leaderboard macro-F1 of the reference (BEiT-base, 5 epochs) for its four strategies.
REFERENCE_MACRO_F1 = {"hr-downscale:64": 0.72, "upscale:256": 0.75, "native": 0.85, "upscale:224": 0.886}


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> Path:
    """PNG at 110 dpi, written atomically, and the figure closed."""
    try:
        atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
    finally:
        pyplot().close(fig)
    return path


def confusion_matrix_png(y_true: list[str], y_pred: list[str], classes: list[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix; label font shrinks with the class count so 25-100 names stay legible."""
    from sklearn.metrics import confusion_matrix

    plt = pyplot()
    matrix = confusion_matrix(y_true, y_pred, labels=classes).astype(float)
    matrix /= np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(max(6.0, 0.22 * n + 3), 30.0)
    font = 9 if n <= 25 else 7 if n <= 60 else 5
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (rows normalised)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def barh_png(
    labels: list[str], values: list[float], path: Path, title: str, xlabel: str, xlim: tuple[float, float] | None = None
) -> Path:
    """Horizontal bars, first label on top; height grows with the label count so 100 names stay legible."""
    plt = pyplot()
    n = len(labels)
    font = 9 if n <= 30 else 7 if n <= 70 else 6
    fig, ax = plt.subplots(figsize=(8, min(max(2.5, 0.16 * n + 1.2), 24)))
    ax.barh(range(n), values, color="#4a7ab8")
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def image_grid_png(
    images: list[np.ndarray], titles: list[str], path: Path, columns: int, cell_inches: float = 1.9
) -> Path:
    """HxWx3 uint8 images of any size drawn in equal cells, pixels unsmoothed (so 64x64 looks 64x64)."""
    import textwrap

    plt = pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * cell_inches, rows * (cell_inches + 0.45)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(title, 26)), fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def curves_png(metrics: pd.DataFrame, path: Path) -> Path:
    """Loss, validation macro-F1, accuracy and learning rate at each validation, over the epochs trained."""
    plt = pyplot()
    panels = [
        ("train_loss", "training loss"),
        ("val_macro_f1", "validation macro-F1"),
        ("val_accuracy", "validation accuracy"),
        ("lr", "learning rate (at validation)"),
    ]
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
    save_figure(fig, path)
    return path


def chart_png(table: pd.DataFrame, path: Path) -> Path:
    """Two panels on one 0-1 scale: this study's validation macro-F1 and the reference's private-test macro-F1."""
    plt = pyplot()
    labels = [f"{r}\n{s}" if table["recipe"].nunique() > 1 else s for r, s in zip(table["recipe"], table["strategy"])]
    panels = [
        (labels, table["val macro-F1"].tolist(), "this study: validation macro-F1", "#4a7ab8"),
        (
            list(REFERENCE_MACRO_F1),
            list(REFERENCE_MACRO_F1.values()),
            "reference (BEiT): private-test macro-F1",
            "#999999",
        ),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, (names, values, title, colour) in zip(axes, panels):
        bars = ax.bar(range(len(names)), values, color=colour)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("macro-F1")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def reliability_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin of the top probability, one line per name
    (``curves``: name -> (probabilities N x C, true classes)), and the diagonal a calibrated model follows."""
    from lowres_birds.model.calibration import ECE_BINS, expected_calibration_error

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for name, (probs, targets) in curves.items():
        confidence, correct = probs.max(1), probs.argmax(1) == targets
        which = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
        filled = [b for b in range(ECE_BINS) if (which == b).any()]
        ax.plot(
            [confidence[which == b].mean() for b in filled],
            [correct[which == b].mean() for b in filled],
            marker="o",
            label=f"{name} (ECE {expected_calibration_error(probs, targets):.3f})",
        )
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def risk_coverage_png(probs: np.ndarray, targets: np.ndarray, path: Path, title: str) -> Path:
    """Accuracy against the share of images answered when the least confident are left unanswered
    (``--min-confidence``), with the thresholds 0.5, 0.7 and 0.9 marked."""
    from lowres_birds.model.calibration import risk_coverage

    plt = pyplot()
    coverage, accuracy, threshold = risk_coverage(probs, targets)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(coverage, accuracy)
    for mark in (0.5, 0.7, 0.9):
        answered = int((threshold >= mark).sum())
        if answered:
            ax.plot(coverage[answered - 1], accuracy[answered - 1], "o", color="black")
            ax.annotate(
                f"P={mark:g}",
                (coverage[answered - 1], accuracy[answered - 1]),
                textcoords="offset points",
                xytext=(4, -12),
            )
    ax.set_xlabel("share answered (coverage)")
    ax.set_ylabel("accuracy of the answered")
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
