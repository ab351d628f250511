"""Figures shared by evaluate, report, eda and study (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def barh_png(labels: list[str], values: list[float], path: Path, title: str, xlabel: str, xlim: tuple[float, float] | None = None) -> Path:
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid_png(images: list[np.ndarray], titles: list[str], path: Path, columns: int, cell_inches: float = 1.9) -> Path:
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
