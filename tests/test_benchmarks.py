"""Benchmark scripts: results are appended without touching other sections, and the GPU script's dry run works on a
CPU."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS_DIR))

from _machine import OtherLoad, record  # noqa: E402


def test_record_appends_a_section_and_keeps_the_others(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    others = (
        "# Benchmarks\n\n## Serving (benchmarks/serve_load.py)\n\n| date | p50 |\n|---|---|\n| 2026-01-01 | 5.0 |\n"
    )
    path.write_text(others, encoding="utf-8")
    args = argparse.Namespace(benchmarks=path, no_record=False)
    with OtherLoad() as load:
        pass
    record(args, "Inference (benchmarks/inference.py)", "2 cores (test CPU)", load, ["| a | b |", "Result: fast"])
    text = path.read_text(encoding="utf-8")
    assert text.startswith(others)
    section = text[len(others) :]
    assert section.startswith("\n## Inference (benchmarks/inference.py) (")
    assert "- machine: 2 cores (test CPU)" in section and "- load: " in section and section.endswith("Result: fast\n")

    record(argparse.Namespace(benchmarks=path, no_record=True), "Ignored", "m", load, ["x"])
    assert path.read_text(encoding="utf-8") == text


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LOWRES_BIRDS_SLOW_TESTS"), reason="~4 min on 2 cores: set LOWRES_BIRDS_SLOW_TESTS=1"
)
def test_gpu_script_dry_run_on_cpu(tmp_path):
    """Every step of gpu.sh (input pipeline, BEiT and lite0 training, each GPU recipe's steps and memory) with tiny
    sizes, on the CPU."""
    done = subprocess.run(
        ["bash", str(BENCHMARKS_DIR / "gpu.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "LOWRES_BIRDS_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "benchmark" not in line]
    recipes = [row.split("|")[1].strip() for row in rows[3:]]
    assert [row.split("|")[1].strip() for row in rows[:3]] == [
        "input pipeline",
        "BEiT-base@224 training",
        "lite0 64->224 training",
    ]
    assert "beit-bf16" in rows[1] and "beit-reference" in rows[1] and "lite0-224" in rows[2]
    gpu_recipes = sorted(
        path.stem
        for path in (BENCHMARKS_DIR.parent / "src" / "lowres_birds" / "recipes").glob("*.yaml")
        if "\n# GPU memory" in path.read_text()
    )
    assert gpu_recipes and recipes == [f"{recipe} memory{ckpt}" for recipe in gpu_recipes for ckpt in ("", ", ckpt")]
    assert all("img/s, max_memory_allocated" in row for row in rows[3:])
    assert "FAILED" not in done.stdout


def test_the_gpu_memory_measurement_trains_a_tiny_recipe_model_on_a_cpu(demo_data):
    """gpu.sh's measured training steps (a GPU recipe's model, bf16 autocast, grad checkpointing) at a toy size on
    the CPU, in a process of its own as on the GPU: the path a GPU run takes, so it cannot drift from train()'s."""
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS_DIR / "gpu_memory.py"),
            "--measure",
            "--recipe",
            "best",
            "--device",
            "cpu",
            "--dry-run",
            "--grad-checkpointing",
            "--data",
            str(demo_data),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best (grad checkpointing on): " in done.stdout and " img/s, max_memory_allocated nan GiB" in done.stdout


def test_the_throughput_benchmark_times_fixed_batches_through_train_one_epoch(demo_data, monkeypatch):
    import train_throughput

    import lowres_birds.train.loop as loop

    batches = []
    one_epoch = loop.train_one_epoch

    def counted(session, loader):
        batches.append(len(loader))
        one_epoch(session, loader)

    monkeypatch.setattr(loop, "train_one_epoch", counted)
    tiny = {"model": "timm:test_efficientnet", "pretrained": False, "strategy": "native", "device": "cpu"}
    monkeypatch.setitem(train_throughput.VARIANTS, "tiny", train_throughput.Variant("tiny", "lite0", tiny))
    assert train_throughput.run_variant("tiny", demo_data, "cpu", warmup=1, steps=2, tiny=True) > 0
    assert batches == [1, 2]  # the warm-up batch, then the timed ones
