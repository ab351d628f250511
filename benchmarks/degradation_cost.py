"""What the randomised degradations cost a training step: the cpu recipe's student steps (training's own session and
``train_one_epoch``, benchmarks/_training.py) as the recipe is vs with --hr-view-ratio/--degradations, alternating
--repeats times; the medians of images/s and the slowdown are printed.

    python benchmarks/degradation_cost.py --ratio 0.3 --degradations default
"""

from __future__ import annotations

import argparse
import statistics

from _machine import OtherLoad, add_record_args, benchmark_data, describe_machine, record
from _training import timed_training

from lowres_birds.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="training data (default: ../shared/data/cub100-lr)")
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--ratio", type=float, default=0.3, help="--hr-view-ratio of the degraded variant")
    parser.add_argument("--degradations", default="default", help="--degradations of the degraded variant")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    add_record_args(parser)
    args = parser.parse_args()
    data = benchmark_data(args.data)
    variants = {
        "recipe as is": load_config(args.recipe),
        f"+ {args.ratio:g} HR views, {args.degradations}": load_config(
            args.recipe, {"hr_view_ratio": args.ratio, "degradations": args.degradations}
        ),
    }
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    with OtherLoad() as load:
        for _ in range(args.repeats):
            for name, cfg in variants.items():
                speeds[name].append(timed_training(cfg, data, warmup=2, steps=args.steps)[0])
                print(f"{name}: {speeds[name][-1]:.1f} images/s")
    plain, degraded = (statistics.median(values) for values in speeds.values())
    body = [
        f"The `{args.recipe}` recipe's student steps on {data} (batch, model and augmentation of the recipe; "
        f"{args.steps} steps x {args.repeats} alternating repeats, medians).",
        "",
        "| variant | images/s (median) | each repeat |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.median(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |"
            for name, v in speeds.items()
        ),
        "",
        f"Slowdown: {100 * (plain / degraded - 1):+.1f} % per step.",
    ]
    print("\n".join(body))
    record(args, "Cost of the randomised degradations (benchmarks/degradation_cost.py)", describe_machine(), load, body)


if __name__ == "__main__":
    main()
