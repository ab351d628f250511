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
