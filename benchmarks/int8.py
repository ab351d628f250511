"""int8 vs fp32 ONNX through ``Classifier`` (the path predict and serve take), on both runtimes: images/s at batch
64 and batch 1 (interleaved rounds in one process), top-1 agreement with the fp32 file on onnxruntime over the
test set, macro-F1 on its labelled part. Three files of one run: fp32, int8 alone (``--fallback-margin 0``) and
int8 with its calibrated float fallback (``export --int8``); each on onnxruntime and, where the [openvino] extra is
installed, on OpenVINO.

    python benchmarks/int8.py --run runs/cpu        # exports the three files to a temporary folder first

Done-when of the int8 work: >= 1.8x images/s at batch 64, top-1 agreement >= 99 %, macro-F1 drop <= 0.005.
"""

from __future__ import annotations

import argparse
import os
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
from lowres_birds.extras import missing
from lowres_birds.metrics import score
from lowres_birds.predict.classifier import ONNX_RUNTIMES, RUNTIME_VARIABLE, Classifier
from lowres_birds.predict.export import export_onnx, file_metadata
from lowres_birds.runtime import keep_freed_memory

REFERENCE = "fp32 onnxruntime"


def images_per_second(classifier: Classifier, images: np.ndarray, batch: int, calls: int) -> float:
    started = time.perf_counter()
    for call in range(calls):
        start = (call * batch) % max(len(images) - batch + 1, 1)
        classifier.predict_arrays(images[start : start + batch], batch_size=batch)
    return batch * calls / (time.perf_counter() - started)


def load_with(path: Path, runtime: str) -> Classifier:
    os.environ[RUNTIME_VARIABLE] = runtime
    try:
        return Classifier.load(path)
    finally:
        del os.environ[RUNTIME_VARIABLE]


def load_with_default(path: Path) -> str:
    """The runtime ``Classifier.load`` picks for ``path`` when none is forced."""
    return Classifier.load(path).runtime


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="trained run folder (its training data calibrates the int8 model)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="test folder (test.csv; test_public_labels.csv when present)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians reported)")
    add_record_args(parser)
    args = parser.parse_args()
    keep_freed_memory()

    table = load_test_table(args.data)
    images = np.asarray(load_images(table.lr_paths, LR_SIZE))
    folder = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    started = time.perf_counter()
    files = {
        "fp32": export_onnx(args.run, folder / "fp32.onnx"),
        "int8 alone": export_onnx(args.run, folder / "int8.onnx", int8=True, fallback_margin=0),
        "int8 + fallback": export_onnx(args.run, folder / "int8-fallback.onnx", int8=True),
    }
    export_s = time.perf_counter() - started
    margin = float(file_metadata(files["int8 + fallback"])["fallback_margin"])
    runtimes = [r for r in ONNX_RUNTIMES if r == "onnxruntime" or not missing(r)]
    contenders = {f"{kind} {runtime}": load_with(path, runtime) for kind, path in files.items() for runtime in runtimes}
    probs = {name: c.predict_arrays(images) for name, c in contenders.items()}
    reference = probs[REFERENCE].argmax(1)
    agreement = {name: float((p.argmax(1) == reference).mean()) for name, p in probs.items()}
    gaps = np.sort(probs["int8 alone onnxruntime"], axis=1)
    fallback_share = float((gaps[:, -1] - gaps[:, -2] < margin).mean())
    f1, rows = {}, []
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
    speedup = {name: median[name, 64] / median[REFERENCE, 64] for name in contenders}
    sizes = {name: files[name.rsplit(" ", 1)[0]].stat().st_size / 1e6 for name in contenders}
    default = {kind: load_with_default(path) for kind, path in files.items()}
    best = f"int8 + fallback {default['int8 + fallback']}"
    f1_text = (
        f", macro-F1 {f1[best] - f1[REFERENCE]:+.4f} ({f1[REFERENCE]:.4f} -> {f1[best]:.4f} on {len(rows)} labelled)"
        if f1
        else ""
    )
    summary = (
        f"export --int8 as predict/serve run it ({best}): batch 64 {median[REFERENCE, 64]:.0f} -> "
        f"{median[best, 64]:.0f} img/s "
        f"({speedup[best]:.2f}x fp32 onnxruntime), top-1 agreement {agreement[best]:.2%} on {len(images)} test "
        f"images{f1_text}; "
        f"fallback margin {margin:.4f} sends {fallback_share:.1%} of the images to float"
    )
    body = [
        "| file and runtime | MB | images/s batch 64 (median) | vs fp32 onnxruntime | images/s batch 1 (median) | "
        "top-1 agreement | macro-F1 (public labels) |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {n} | {sizes[n]:.1f} | {median[n, 64]:.0f} | {speedup[n]:.2f}x | {median[n, 1]:.0f} | "
            f"{agreement[n]:.2%} | {f1.get(n, float('nan')):.4f} |"
            for n in contenders
        ),
        "",
        f"Model: {args.run}; the three files exported in this run ({export_s:.0f} s together; int8 calibration on 256 "
        "of the "
        f"run's training images, the fallback margin on its validation split); threads: every core; {args.rounds} "
        "interleaved rounds.",
        "",
        f"Result: {summary}",
    ]
    record(args, "int8 inference (benchmarks/int8.py)", machine, load, body)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
