"""Inference speed: images/s and p50/p95 latency at batch 1 and batch 64, PyTorch eager vs the exported ONNX model
on onnxruntime (CPU), through the same ``Classifier.predict_arrays`` the CLI and server use, on the same inputs.

Before timing, both predict the whole test set and the script fails unless every top-1 prediction is identical.

    python benchmarks/inference.py --run runs/cpu                   # exports runs/cpu to a temporary model.onnx
    python benchmarks/inference.py --run runs/cpu --onnx model.onnx
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record

from lowres_birds.config import LR_SIZE
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_test_table
from lowres_birds.predict.classifier import Classifier
from lowres_birds.predict.export import export_onnx
from lowres_birds.runtime import keep_freed_memory


def latencies(classifier: Classifier, images: np.ndarray, batch: int, calls: int) -> np.ndarray:
    """Seconds per ``predict_arrays`` call on consecutive batches of ``batch`` images (wrapping around; batch <= N)."""
    times = np.empty(calls)
    for call in range(calls):
        start = (call * batch) % max(len(images) - batch + 1, 1)
        chunk = images[start : start + batch]
        started = time.perf_counter()
        classifier.predict_arrays(chunk, batch_size=batch)
        times[call] = time.perf_counter() - started
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="trained run folder")
    parser.add_argument("--onnx", type=Path, help="its exported model (default: exported now to a temporary file)")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="folder with test.csv (its images are the inputs)"
    )
    parser.add_argument(
        "--calls", type=int, default=300, help="timed calls at batch 1 (batch 64 gets a sixth as many, at least 5)"
    )
    add_record_args(parser)
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does

    images = np.asarray(load_images(load_test_table(args.data).lr_paths, LR_SIZE))  # N x 64 x 64 x 3 uint8
    onnx_path = args.onnx or export_onnx(args.run, Path(tempfile.mkdtemp(prefix="bench-onnx-")) / "model.onnx")
    contenders = {"pytorch eager": Classifier.load(args.run), "onnxruntime": Classifier.load(onnx_path)}

    probs = {name: classifier.predict_arrays(images) for name, classifier in contenders.items()}
    torch_top1, onnx_top1 = (p.argmax(1) for p in probs.values())
    mismatches = int((torch_top1 != onnx_top1).sum())
    max_diff = float(np.abs(probs["pytorch eager"] - probs["onnxruntime"]).max())
    print(
        f"{len(images)} test images: {mismatches} different top-1 predictions, max probability difference "
        f"{max_diff:.2e}"
    )
    if mismatches:
        raise SystemExit("ONNX and PyTorch predictions differ; not timing a model that is wrong")

    machine = describe_machine("cpu")
    rows, rates = [], {}
    with OtherLoad() as load:
        for batch, calls in ((1, args.calls), (min(64, len(images)), max(args.calls // 6, 5))):
            for name, classifier in contenders.items():
                latencies(classifier, images, batch, 3)  # warm-up
                times = latencies(classifier, images, batch, calls)
                rates[name, batch] = batch * calls / times.sum()
                p50, p95 = np.percentile(times, [50, 95]) * 1000
                rows.append(f"| {name} | {batch} | {calls} | {rates[name, batch]:.1f} | {p50:.2f} | {p95:.2f} |")
                print(rows[-1], flush=True)
    big = min(64, len(images))
    speedups = {batch: rates["onnxruntime", batch] / rates["pytorch eager", batch] for batch in (1, big)}
    summary = (
        f"inference (cpu): batch 1 {rates['pytorch eager', 1]:.0f} -> {rates['onnxruntime', 1]:.0f} img/s "
        f"({speedups[1]:.1f}x with ONNX), batch {big} {rates['pytorch eager', big]:.0f} -> "
        f"{rates['onnxruntime', big]:.0f} img/s "
        f"({speedups[big]:.1f}x); top-1 identical on {len(images)} test images (max prob diff {max_diff:.1e})"
    )
    body = [
        "| runtime | batch | calls | images/s | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Model: {args.run} ({contenders['pytorch eager'].input_size}px input); inputs: {args.data.name} test set "
        f"({len(images)} images, 64x64); latency = one Classifier.predict_arrays call.",
        "",
        f"Result: {summary}",
    ]
    record(args, "Inference (benchmarks/inference.py)", machine, load, body)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
