"""What the randomised degradations cost a training step: the cpu recipe's student steps (training's own session and
``train_one_epoch``, benchmarks/_training.py) as the recipe is vs with --hr-view-ratio/--degradations, alternating
--repeats times; the medians of images/s (wall) and of CPU ms per image over the timed steps (this process's CPU
time: what a step costs whatever else shares the cores) and the slowdown in both are printed.

    python benchmarks/degradation_cost.py --ratio 0.3 --degradations default
"""

from __future__ import annotations

import argparse
import statistics
import time

from _machine import OtherLoad, add_record_args, benchmark_data, describe_machine, record
from _training import timed_training

from lowres_birds.config import load_config


class CpuClock:
    """This process's CPU seconds inside the block (timed_training's ``around_timed``)."""

    def __enter__(self) -> CpuClock:
        self.started = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.process_time() - self.started


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
    cpu_ms: dict[str, list[float]] = {name: [] for name in variants}
    with OtherLoad() as load:
        for _ in range(args.repeats):
            for name, cfg in variants.items():
                clock = CpuClock()
                speeds[name].append(timed_training(cfg, data, warmup=2, steps=args.steps, around_timed=clock)[0])
                cpu_ms[name].append(1000 * clock.seconds / (args.steps * cfg.batch_size))
                print(f"{name}: {speeds[name][-1]:.1f} images/s, {cpu_ms[name][-1]:.1f} CPU ms per image")
    plain, degraded = (statistics.median(values) for values in speeds.values())
    plain_cpu, degraded_cpu = (statistics.median(values) for values in cpu_ms.values())
    body = [
        f"The `{args.recipe}` recipe's student steps on {data} (batch, model and augmentation of the recipe; "
        f"{args.steps} steps x {args.repeats} alternating repeats, medians).",
        "",
        "| variant | images/s (median) | each repeat | CPU ms per image (median) | each repeat |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {statistics.median(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} | "
            f"{statistics.median(cpu_ms[name]):.1f} | {', '.join(f'{x:.1f}' for x in cpu_ms[name])} |"
            for name, v in speeds.items()
        ),
        "",
        f"Slowdown per step: {100 * (plain / degraded - 1):+.1f} % in wall time, "
        f"{100 * (degraded_cpu / plain_cpu - 1):+.1f} % in CPU time.",
    ]
    print("\n".join(body))
    record(args, "Cost of the randomised degradations (benchmarks/degradation_cost.py)", describe_machine(), load, body)


if __name__ == "__main__":
    main()
