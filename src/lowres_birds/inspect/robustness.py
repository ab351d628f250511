"""How much a trained run pays when its 64x64 photos are made another way than its training images were.

The validation split's HR twins (never the test set) are degraded by every cell of a grid (kernels x blur x JPEG x
noise, config.parse_degradation_grid; each cell seeded) and scored; the drop of each cell is measured against the
run's own real LR validation images. ``evaluate --run RUN --degradations GRID`` and benchmarks/robustness.py both
call ``robustness_scores``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lowres_birds.config import HR_SIZE, parse_degradation_grid
from lowres_birds.data.degradations import degrade_randomly
from lowres_birds.data.images import load_images
from lowres_birds.data.splits import run_split
from lowres_birds.errors import UserError
from lowres_birds.metrics import score
from lowres_birds.model.resolution import to_nchw
from lowres_birds.predict.classifier import Classifier
from lowres_birds.run_dir import RunDir, check_output, write_csv

GRID_SEED = 0  # cell i draws its noise from seed GRID_SEED + i: every run is scored on the same images
CHUNK = 64  # HR twins degraded at a time (64 x 196 KB)


def robustness_scores(
    run_path: Path, data_dir: Path | None, grid: str, tta: str = "none", device: str = "cpu"
) -> pd.DataFrame:
    """One row per grid cell (degradation, macro_f1, drop), after a first row for the real LR validation images
    (drop 0); refused in one line when the data has no HR twins."""
    cells = parse_degradation_grid(grid)  # a bad grid fails before the model loads
    run = RunDir(run_path)
    split = run_split(run, data_dir)
    if split.table.hr_paths is None:
        raise UserError(
            f"the robustness grid degrades the validation images' high-res twins, but {split.table.hr_missing}; "
            "pass the run's training data (--data) with its upscale_img_path column"
        )
    classifier = Classifier.load(run_path, device)
    truth = [split.table.labels[i] for i in split.val_rows]
    hr_twins = load_images(split.table.hr_paths, HR_SIZE)

    def macro_f1(images: np.ndarray, what: str) -> float:
        probs = classifier.predict_arrays(images, tta=tta, progress=f"{what}: {len(images)} validation images")
        return score(truth, [classifier.labels[i] for i in probs.argmax(1)])["macro_f1"]

    rows = [{"degradation": "real LR validation images", "macro_f1": macro_f1(split.lr_images(split.val_rows), "LR")}]
    for index, family in enumerate(cells):
        generator = torch.Generator().manual_seed(GRID_SEED + index)
        degraded = [
            degrade_randomly(to_nchw(np.asarray(hr_twins[split.val_rows[start : start + CHUNK]])), family, generator)
            for start in range(0, len(split.val_rows), CHUNK)
        ]
        images = torch.cat(degraded).permute(0, 2, 3, 1).numpy()
        rows.append({"degradation": str(family), "macro_f1": macro_f1(images, f"cell {index + 1}/{len(cells)}")})
    table = pd.DataFrame(rows)
    table["drop"] = table["macro_f1"].iloc[0] - table["macro_f1"]
    return table


def summarise(table: pd.DataFrame) -> dict[str, float | str]:
    """Mean and worst drop over the grid's cells (the first row, the real LR images, excluded)."""
    cells = table.iloc[1:]
    worst = cells["drop"].idxmax()
    return {
        "lr_macro_f1": float(table["macro_f1"].iloc[0]),
        "cells": len(cells),
        "mean_drop": float(cells["drop"].mean()),
        "worst_drop": float(cells["drop"].max()),
        "worst_cell": str(cells.loc[worst, "degradation"]),
    }


def evaluate_robustness(
    run_path: Path, data_dir: Path | None, grid: str, out_dir: Path, force: bool, tta: str = "none", device: str = "cpu"
) -> dict:
    """Print every cell and the summary; write robustness.csv into ``out_dir``."""
    out = out_dir / "robustness.csv"
    check_output(out, force, others=[("--run", run_path)])
    table = robustness_scores(run_path, data_dir, grid, tta, device)
    write_csv(out, table)
    summary = summarise(table)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"\nLR validation macro-F1 {summary['lr_macro_f1']:.4f}; over {summary['cells']} other degradations: mean drop "
        f"{summary['mean_drop']:.4f}, worst drop {summary['worst_drop']:.4f} ({summary['worst_cell']}); table: {out}"
    )
    return summary
