"""Two processes on CPU (torchrun, gloo): training runs unchanged, metrics cover the whole validation set,
only rank 0 writes files, and the schedule counts steps the same as one process would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowres_birds.config import LR_SIZE
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_train_table
from lowres_birds.metrics import score
from lowres_birds.predict.classifier import Classifier
from lowres_birds.run_dir import MARKER, RunDir

EPOCHS = 2
TRAIN = [
    "--model",
    "timm:test_efficientnet",
    "--no-pretrained",
    "--strategy",
    "upscale:72",
    "--epochs",
    str(EPOCHS),
    "--batch-size",
    "4",
    "--lr",
    "1e-3",
    "--schedule",
    "cosine",
    "--warmup-epochs",
    "0",
    "--val-fraction",
    "0.3",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def two_process_run(demo_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("distributed") / "run"
    run.mkdir()
    (run / MARKER).write_text("")  # an earlier output of this tool, so --force may replace it
    (run / "stale.txt").write_text("replaced by --force")  # both ranks see it; only rank 0 may delete it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWRES_BIRDS_CACHE": str(tmp_path_factory.mktemp("cache"))}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lowres_birds",
        "train",
        "--data",
        str(demo_data),
        "--out",
        str(run),
        "--force",
        *TRAIN,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rank_0_alone_writes_the_run(two_process_run):
    run, result = two_process_run
    assert not (run / "stale.txt").exists()
    # one line per epoch, not per rank
    assert [record["epoch"] for record in metrics(run)] == list(range(1, EPOCHS + 1))
    assert (run / "checkpoint.pt").is_file() and (run / "model.safetensors").is_file()
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert result.stdout.count("weights: validation macro-F1") == 1


def test_validation_macro_f1_equals_one_process_scoring_the_kept_weights(two_process_run, demo_data):
    run, _ = two_process_run
    val_ids = set(json.loads((run / "split.json").read_text())["val_ids"])
    table = load_train_table(demo_data)
    rows = [i for i, image_id in enumerate(table.ids) if image_id in val_ids]
    images = load_images([table.lr_paths[i] for i in rows], LR_SIZE)
    predicted = np.asarray(Classifier.load(run).labels)[Classifier.load(run).predict_arrays(images).argmax(1)]
    single = score([table.labels[i] for i in rows], predicted.tolist())
    kept = RunDir(run).kept_record()  # the recipe's: the last validation's (cpu keeps its last epoch's weights)
    assert len(rows) == 9  # 30 images x 0.3: an odd count, so the last batch is padded on one rank
    assert kept["val_macro_f1"] == pytest.approx(single["macro_f1"], abs=1e-12)
    assert kept["val_accuracy"] == pytest.approx(single["accuracy"], abs=1e-12)


def test_cosine_schedule_is_half_way_after_half_the_epochs(two_process_run):
    """accelerate steps the scheduler once per process per optimizer step; the run must count in those units."""
    run, _ = two_process_run
    assert metrics(run)[0]["lr"] == pytest.approx(0.5e-3, rel=1e-6)
    assert metrics(run)[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_fine_tuned_teacher_trains_inside_a_two_process_run_and_rank_0_alone_writes_its_targets(demo_data, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWRES_BIRDS_CACHE": str(tmp_path / "cache")}
    flags = [
        *TRAIN[: TRAIN.index("--epochs")],
        "--epochs",
        "1",
        *TRAIN[TRAIN.index("--epochs") + 2 :],
        "--teacher",
        "finetuned",
        "--teacher-epochs",
        "1",
        "--teacher-size",
        "64",
        "--kd-weight",
        "0.7",
        "--feature-kd-weight",
        "1",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lowres_birds",
        "train",
        "--data",
        str(demo_data),
        "--out",
        str(run),
        *flags,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    teacher = run / "teacher"
    assert [record["epoch"] for record in metrics(teacher)] == [1] and [record["epoch"] for record in metrics(run)] == [
        1
    ]
    assert not [p.name for folder in (run, teacher) for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert result.stdout.count("HR teacher finetuned") == 1
    assert RunDir(teacher).teacher_targets(30, 3, damaged="test")["logits"].shape == (30, 3)
