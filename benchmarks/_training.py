"""Training steps for the throughput and memory benchmarks: a run opened and built by the package's own session
(as ``train`` builds it), then a few fixed batches through training's ``train_one_epoch``, timed."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path

import numpy as np


def timed_training(cfg, data_dir: Path, warmup: int, steps: int, *, compile: bool = False, around_timed=None):
    """(images/s over ``steps`` optimizer steps after ``warmup`` untimed ones, the session). No HR teacher, no
    budget, no validation and no checkpoint within the steps: what fills the device is the student's step."""
    import torch

    from lowres_birds.train.batches import make_loader
    from lowres_birds.train.loop import train_one_epoch
    from lowres_birds.train.session import RunSession, open_run

    cfg = dataclasses.replace(
        cfg, budget_minutes=0, student_from_teacher=False, val_every=1.0, checkpoint_every=0, log="none"
    )
    opened = open_run(cfg, data_dir, Path(tempfile.mkdtemp(prefix="bench-run-")) / "run")
    if compile:
        opened.model.compile()
    session = RunSession.create(opened)

    def loader_over(rows: np.ndarray):  # the training rows in their order: every variant times the same batches
        loader = make_loader(opened.data.train_images, opened.data.targets, rows, cfg.batch_size, cfg.seed, False)
        return session.parts.accelerator.prepare(loader)

    per_step = cfg.batch_size * cfg.grad_accum
    batches = np.resize(opened.data.train_idx, (warmup + steps) * per_step)  # repeats rows on small data sets
    train_one_epoch(session, loader_over(batches[: warmup * per_step]))
    cuda = session.parts.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    session.meter.reset()
    with around_timed or contextlib.nullcontext():
        train_one_epoch(session, loader_over(batches[warmup * per_step :]))
    # stats() ends with a reduction of the loss sum: GPU work is included.
    return session.meter.stats(session.parts.accelerator)["train_images_per_s"], session
