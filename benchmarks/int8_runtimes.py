"""onnxruntime vs OpenVINO on the same exported files: the fp32 and the ``--int8`` ONNX of one run, batch 64
images/s (interleaved rounds in one process) and top-1 agreement with onnxruntime's fp32 on the test set. It
decides whether an OpenVINO runtime is worth serving (issue: keep the runtime that wins on the same model).

    pip install openvino
    python benchmarks/int8_runtimes.py --run runs/cpu
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record
from lowres_birds.config import LR_SIZE
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_test_table
from lowres_birds.predict.export import export_onnx

BATCH, CALLS = 64, 10


def runners(models: dict[str, Path], threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """name -> function(uint8 NHWC batch) -> probabilities, for each runtime and model."""
    import onnxruntime as ort
    import openvino as ov

    core, found = ov.Core(), {}
    for kind, path in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        found[f"onnxruntime {kind}"] = lambda batch, session=session, name=name: session.run(None, {name: batch})[0]
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "f32"})
        found[f"openvino {kind}"] = lambda batch, compiled=compiled: compiled(batch)[0]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="trained run folder (its training data calibrates the int8 model)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="test folder (test.csv)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians reported)")
    add_record_args(parser)
    args = parser.parse_args()
    try:
        import openvino  # noqa: F401
    except ImportError:
        sys.exit("error: this benchmark needs OpenVINO: pip install openvino")

    images = np.ascontiguousarray(load_images(load_test_table(args.data).lr_paths, LR_SIZE))
    folder = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    models = {"fp32": export_onnx(args.run, folder / "fp32.onnx"), "int8": export_onnx(args.run, folder / "int8.onnx", int8=True)}
    contenders = runners(models, args.threads)
    top1 = {name: np.concatenate([run(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]).argmax(1) for name, run in contenders.items()}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    batch = images[:BATCH]
    with OtherLoad() as load:
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, run in contenders.items():
                started = time.perf_counter()
                for _ in range(CALLS):
                    run(batch)
                if round_:
                    rates[name].append(BATCH * CALLS / (time.perf_counter() - started))
    base = float(np.median(rates["onnxruntime fp32"]))
    rows = [f"| {name} | {np.median(rates[name]):.0f} | {np.median(rates[name]) / base:.2f}x | {100 * (top1[name] == top1['onnxruntime fp32']).mean():.2f} % |"
            for name in contenders]
    body = ["| runtime and model | images/s, batch 64 (median) | vs onnxruntime fp32 | top-1 agreement with onnxruntime fp32 |",
            "|---|---|---|---|", *rows, "",
            f"Model: {args.run}, exported in this run (`export --format onnx [--int8]`); {len(images)} test images; "
            f"{args.threads} threads per runtime; {args.rounds} interleaved rounds of {CALLS} batches."]
    print("\n".join(body))
    record(args, "int8: onnxruntime vs OpenVINO on the same files (benchmarks/int8_runtimes.py)", describe_machine("cpu"), load, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
