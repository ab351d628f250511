"""``--seed S --deterministic`` on CPU: two runs give the same metrics and bit-identical weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowres_birds.cli import main

# Augmentation (TrivialAugment and erasing included), a class-balanced smoothed loss and a warmup + cosine schedule
# on, so every random draw matters.
RUN = [
    "--model",
    "timm:test_efficientnet",
    "--no-pretrained",
    "--strategy",
    "upscale:72",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--lr",
    "3e-3",
    "--hflip",
    "--crop-scale-min",
    "0.7",
    "--trivial-augment",
    "--random-erasing",
    "0.3",
    "--label-smoothing",
    "0.1",
    "--class-balanced-beta",
    "0.9",
    "--schedule",
    "cosine",
    "--warmup-epochs",
    "0.5",
    "--device",
    "cpu",
    "--deterministic",
]
TIMING_KEYS = {"train_images_per_s", "elapsed_s"}


def train(data: Path, out: Path, seed: int) -> Path:
    assert main(["train", "--data", str(data), "--out", str(out), *RUN, "--seed", str(seed)]) == 0
    return out


def metrics(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def assert_same_tensors(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("determinism")
    return train(demo_data, root / "a", seed=5), train(demo_data, root / "b", seed=5)


def test_same_seed_gives_identical_metrics(runs):
    first, second = runs
    assert len(metrics(first)) == 2
    assert metrics(first) == metrics(second)


def test_same_seed_gives_identical_weights_and_checkpoints(runs):
    first, second = runs
    assert_same_tensors(load_file(first / "model.safetensors"), load_file(second / "model.safetensors"))
    checkpoints = [torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False) for run in (first, second)]
    assert_same_tensors(checkpoints[0]["model"], checkpoints[1]["model"])
    for one, two in zip(checkpoints[0]["optimizer"]["state"].values(), checkpoints[1]["optimizer"]["state"].values()):
        assert_same_tensors(one, two)
