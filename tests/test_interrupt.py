"""Interruption: a real training process killed mid-epoch (SIGKILL) or stopped (SIGINT) resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowres_birds.cli import main

ARGS = [
    "--model",
    "efficientnet_lite0",
    "--strategy",
    "native",
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--seed",
    "5",
    "--hflip",
    "--crop-scale-min",
    "0.8",
    "--trivial-augment",
    "--random-erasing",
    "0.3",
    "--checkpoint-every",
    "2",
    "--device",
    "cpu",
]


def _start_training(data: Path, run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lowres_birds", "train", "--data", str(data), "--out", str(run), *ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_checkpoint(process: subprocess.Popen, run: Path, deadline_s: float = 300) -> None:
    deadline = time.monotonic() + deadline_s
    while not (run / "checkpoint.pt").exists():
        assert process.poll() is None, f"training ended before its first checkpoint: {process.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.02)


def _last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(demo_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["train", "--data", str(demo_data), "--out", str(straight), *ARGS]) == 0

    process = _start_training(demo_data, killed)
    _wait_for_checkpoint(process, killed)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    checkpoint = torch.load(killed / "checkpoint.pt", map_location="cpu", weights_only=False)  # never half-written
    assert checkpoint["state"]["global_step"] < 14, "the process finished before it was killed"

    assert main(["train", "--resume", str(killed)]) == 0
    resumed, expected = _last_metrics(killed), _last_metrics(straight)
    assert resumed["epoch"] == expected["epoch"] == 2
    assert (resumed["train_loss"], resumed["val_macro_f1"], resumed["val_accuracy"]) == (
        expected["train_loss"],
        expected["val_macro_f1"],
        expected["val_accuracy"],
    )


def test_sigint_saves_a_checkpoint_and_exits_130(demo_data, tmp_path):
    run = tmp_path / "interrupted"
    process = _start_training(demo_data, run)
    _wait_for_checkpoint(process, run)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    message = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert message and "--resume" in message[0] and "Traceback" not in stderr
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]
    assert main(["train", "--resume", str(run)]) == 0
    assert _last_metrics(run)["epoch"] == 2 and state["global_step"] >= 2
