"""Shared by the benchmark scripts: describe the machine, tell whether it was quiet, append results to BENCHMARKS.md.

Each script appends its own section (``record``); sections written by other scripts are never rewritten.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cub100-lr"
BUSY_CORES = 0.25  # other processes using more than this many cores on average skew the figures


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: str = "cpu") -> str:
    """'2 cores (AMD EPYC), torch 2.x, 2 threads, device cpu' (+ the GPU's name on CUDA)."""
    import torch

    threads = torch.get_num_threads()
    text = f"{cores()} cores ({cpu_model()}), torch {torch.__version__}, {threads} threads, device {device}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f" ({torch.cuda.get_device_name(0)})"
    return text


class OtherLoad:
    """How many cores other processes kept busy while the benchmark ran (from /proc/stat minus our own CPU time)."""

    def __enter__(self) -> OtherLoad:
        self.start = self._snapshot()
        self.cores_used: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        end = self._snapshot()
        if self.start is not None and end is not None:
            busy, own, wall = (e - s for e, s in zip(end, self.start))
            self.cores_used = max(0.0, (busy - own) / wall) if wall > 0 else 0.0

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        stat = Path("/proc/stat")
        if not stat.is_file():
            return None
        ticks = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal, without guest (already in user)
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        return busy, own, times.elapsed

    def note(self) -> str:
        if self.cores_used is None:
            return "other load: unknown"
        if self.cores_used > BUSY_CORES:
            return (
                f"NOT QUIET: other processes used {self.cores_used:.2f} of {cores()} cores on average; figures "
                "skewed low"
            )
        return f"quiet (other processes used {self.cores_used:.2f} cores on average)"


def add_record_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--benchmarks", type=Path, default=BENCHMARKS, help="markdown file to append the result section to"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch the markdown file")


def record(args: argparse.Namespace, title: str, machine: str, load: OtherLoad, body: list[str]) -> None:
    """Append one section (title, date, command, machine, load, body lines) unless --no-record."""
    if args.no_record:
        return
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"## {title} ({date})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}",
        f"- load: {load.note()}",
        "",
        *body,
    ]
    path = Path(args.benchmarks)
    prefix = "" if not path.exists() else ("\n" if path.read_text(encoding="utf-8").endswith("\n") else "\n\n")
    with open(path, "a", encoding="utf-8") as handle:
        if not path.stat().st_size:
            handle.write(
                "# Benchmarks\n\nEach section is appended by the script it names; figures are only comparable within a "
                "section.\n\n"
            )
        handle.write(prefix + "\n".join(lines) + "\n")


def benchmark_data(requested: Path | None, small: bool = False) -> Path:
    """--data if given, else ../shared/data/cub100-lr, else a synthetic set (small for dry runs) in a temp folder."""
    import tempfile

    from lowres_birds.data.demo import make_demo_dataset

    if requested is not None:
        return requested
    if DEFAULT_DATA.joinpath("train.csv").is_file() and not small:
        return DEFAULT_DATA
    folder = Path(tempfile.mkdtemp(prefix="lowres-birds-bench-"))
    sizes = {"train_per_class": 8, "test_per_class": 4, "classes": 3} if small else {}
    return make_demo_dataset(folder / "data", **sizes)
