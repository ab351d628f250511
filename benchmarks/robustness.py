"""Robustness to other degradations: each run scored on its validation split's HR twins made 64x64 by every cell of
a grid (kernels x blur x JPEG x noise), the drop measured against its real LR validation images; the mean and
worst drop per run. The same code as ``lowres-birds evaluate --run RUN --degradations GRID``.

    python benchmarks/robustness.py --run /work/runs/base-s42 --run /work/runs/d26b-s42 --data ../shared/data/cub100-lr
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record

from lowres_birds.inspect.robustness import robustness_scores, summarise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", required=True, help="a trained run folder (repeatable)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the runs' training data (with HR twins)")
    parser.add_argument("--grid", default="default", help="a named grid or a spec (evaluate --degradations)")
    parser.add_argument("--tta", choices=("none", "flip"), default="none")
    add_record_args(parser)
    args = parser.parse_args()
    body = [
        f"Grid `{args.grid}`; drops against each run's own real LR validation images (macro-F1; ~413 images, so a "
        "cell's noise is ~0.01-0.02).",
        "",
        "| run | LR val macro-F1 | cells | mean drop | worst drop | worst cell |",
        "|---|---|---|---|---|---|",
    ]
    with OtherLoad() as load:
        for run in args.run:
            table = robustness_scores(run, args.data, args.grid, args.tta)
            s = summarise(table)
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            line = (
                f"| {run} | {s['lr_macro_f1']:.4f} | {s['cells']} | {s['mean_drop']:.4f} | {s['worst_drop']:.4f} | "
                f"`{s['worst_cell']}` |"
            )
            print(line)
            body.append(line)
    record(args, "Robustness to other degradations (benchmarks/robustness.py)", describe_machine(), load, body)


if __name__ == "__main__":
    main()
