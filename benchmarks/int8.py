"""int8 vs fp32 ONNX: images/s at batch 64 and batch 1 (interleaved rounds in one run), top-1 agreement on the
test set and macro-F1 of both on the labelled part of it.

    python benchmarks/int8.py --run runs/cpu        # exports both models to a temporary folder first

Done-when of the int8 work: >= 1.8x images/s at batch 64, top-1 agreement >= 99 %, macro-F1 drop <= 0.005.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record
from lowres_birds.config import LR_SIZE
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_test_table
from lowres_birds.metrics import score
from lowres_birds.predict.classifier import Classifier
from lowres_birds.predict.export import export_onnx
from lowres_birds.runtime import keep_freed_memory


def images_per_second(classifier: Classifier, images: np.ndarray, batch: int, calls: int) -> float:
    started = time.perf_counter()
    for call in range(calls):
        start = (call * batch) % max(len(images) - batch + 1, 1)
        classifier.predict_arrays(images[start : start + batch], batch_size=batch)
    return batch * calls / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="trained run folder (its training data calibrates the int8 model)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="test folder (test.csv; test_public_labels.csv when present)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians reported)")
    add_record_args(parser)
    args = parser.parse_args()
    keep_freed_memory()

    table = load_test_table(args.data)
    images = np.asarray(load_images(table.lr_paths, LR_SIZE))
    folder = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    started = time.perf_counter()
    models = {"fp32": export_onnx(args.run, folder / "fp32.onnx"), "int8": export_onnx(args.run, folder / "int8.onnx", int8=True)}
    export_s = time.perf_counter() - started
    contenders = {name: Classifier.load(path) for name, path in models.items()}
    probs = {name: c.predict_arrays(images) for name, c in contenders.items()}
    agreement = float((probs["fp32"].argmax(1) == probs["int8"].argmax(1)).mean())
    f1 = {}
    labels_csv = args.data / "test_public_labels.csv"
    if labels_csv.is_file():
        truth = dict(pd.read_csv(labels_csv, dtype=str)[["id", "label"]].itertuples(index=False))
        rows = [i for i, image_id in enumerate(table.ids) if image_id in truth]
        for name, p in probs.items():
            names = contenders[name].labels
            f1[name] = score([truth[table.ids[i]] for i in rows], [names[k] for k in p[rows].argmax(1)])["macro_f1"]

    machine = describe_machine("cpu")
    rates: dict[tuple[str, int], list[float]] = {}
    with OtherLoad() as load:
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for batch, calls in ((64, 8), (1, 100)):
                for name, classifier in contenders.items():
                    rate = images_per_second(classifier, images, batch, calls)
                    if round_:
                        rates.setdefault((name, batch), []).append(rate)
    median = {key: float(np.median(values)) for key, values in rates.items()}
    speedup = {batch: median["int8", batch] / median["fp32", batch] for batch in (64, 1)}
    sizes = {name: path.stat().st_size / 1e6 for name, path in models.items()}
    f1_text = f"; macro-F1 {f1['fp32']:.4f} -> {f1['int8']:.4f} ({f1['int8'] - f1['fp32']:+.4f}) on {len(rows)} labelled" if f1 else ""
    summary = (
        f"int8 ONNX: batch 64 {median['fp32', 64]:.0f} -> {median['int8', 64]:.0f} img/s ({speedup[64]:.2f}x), "
        f"batch 1 {median['fp32', 1]:.0f} -> {median['int8', 1]:.0f} img/s ({speedup[1]:.2f}x); top-1 agreement "
        f"{agreement:.2%} on {len(images)} test images{f1_text}; {sizes['fp32']:.1f} -> {sizes['int8']:.1f} MB"
    )
    body = [
        "| model | MB | images/s batch 64 (median) | images/s batch 1 (median) | macro-F1 (public labels) |", "|---|---|---|---|---|",
        *(f"| {n} | {sizes[n]:.1f} | {median[n, 64]:.0f} | {median[n, 1]:.0f} | {f1.get(n, float('nan')):.4f} |" for n in models),
        "", f"Model: {args.run}; both exported in this run ({export_s:.0f} s together, calibration on 256 of the run's "
        f"training images); {args.rounds} interleaved rounds.", "", f"Result: {summary}",
    ]
    record(args, "int8 inference (benchmarks/int8.py)", machine, load, body)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
