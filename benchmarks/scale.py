"""Cost as the data grows: synthetic competition test folders of 1k, 10k and 100k images (hard links to a few
real files, written once and cached), timing each step separately in a fresh process per size:

- table:    ``load_test_table`` (test.csv in sample_submission.csv's order, every file checked)
- decode:   ``load_images`` into an empty image cache (decoded once, streamed to disk)
- predict:  ``predict_test_set`` + writing the submission (a tiny untrained model, so the pipeline dominates)
- evaluate: ``evaluate_submission`` against a labels CSV (per-class table + confusion matrix)

It prints the time per image of each step and the slope (time per image at the largest size / at the smallest;
1.0 is linear), and the peak resident memory of each size's process.

    python benchmarks/scale.py                       # 1k, 10k, 100k
    python benchmarks/scale.py --sizes 1000,10000 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record

STEPS = ("table", "decode", "predict", "evaluate")
CLASSES = 25  # as the competition
SOURCE_FILES = 64


def source_images(cache: Path) -> list[Path]:
    """A few real 64x64 test photos (cub100-lr when present, else the synthetic demo set)."""
    folder = DEFAULT_DATA / "test"
    if not folder.is_dir():
        from lowres_birds.data.demo import make_demo_dataset

        folder = make_demo_dataset(cache / "demo", train_per_class=2, test_per_class=8) / "test"
    return sorted(folder.iterdir())[:SOURCE_FILES]


def synthetic_folder(cache: Path, size: int) -> Path:
    """A competition test layout of ``size`` images, built once (hard links, so it costs no image bytes)."""
    import numpy as np
    import pandas as pd

    folder = cache / f"test-{size}"
    if (folder / "complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "test").mkdir(parents=True)
    sources = source_images(cache)
    ids = [f"TEST_{i:06d}" for i in range(size)]
    for i, image_id in enumerate(ids):
        target = folder / "test" / f"{image_id}.jpg"
        try:
            os.link(sources[i % len(sources)], target)
        except OSError:  # another file system: copy instead
            shutil.copyfile(sources[i % len(sources)], target)
    pd.DataFrame({"id": ids, "img_path": [f"./test/{i}.jpg" for i in ids]}).to_csv(folder / "test.csv", index=False)
    shuffled = list(np.random.default_rng(0).permutation(ids))  # the submission order differs from test.csv's
    pd.DataFrame({"id": shuffled, "label": 0}).to_csv(folder / "sample_submission.csv", index=False)
    labels = [f"species_{i % CLASSES:02d}" for i in range(size)]
    pd.DataFrame({"id": ids, "label": labels}).to_csv(folder / "labels.csv", index=False)
    (folder / "complete").write_text("ok")
    return folder


def tiny_run(cache: Path) -> Path:
    """A loadable run folder with a small untrained network at 64x64 (the model's cost is not what is measured)."""
    from lowres_birds.config import LR_SIZE
    from lowres_birds.model.factory import create_model, save_architecture
    from lowres_birds.run_dir import RunDir

    run = RunDir(cache / "tiny-run")
    if not (run / RunDir.WEIGHTS).is_file():
        labels = [f"species_{i:02d}" for i in range(CLASSES)]
        model = create_model("timm:test_efficientnet", labels, LR_SIZE, pretrained=False)
        save_architecture(model, run)
        run.write_labels(labels)
        run.save_weights(model.state_dict())
    return run.path


class AnonymousMemoryPeak:
    """The largest RssAnon of this process, sampled every 20 ms: memory the program allocated, as opposed to
    file pages of the memory-mapped image cache that RSS also counts (the kernel drops those when it needs to)."""

    def __init__(self):
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def measure(folder: Path, run: Path, work: Path) -> dict:
    """One size, in this (fresh) process: seconds per step, peak RSS and peak anonymous memory."""
    import contextlib
    import io

    import pandas as pd

    from lowres_birds.config import LR_SIZE
    from lowres_birds.data.images import load_images
    from lowres_birds.data.tables import load_test_table
    from lowres_birds.inspect.evaluate import evaluate_submission
    from lowres_birds.predict.classifier import predict_test_set
    from lowres_birds.run_dir import write_csv

    os.environ["LOWRES_BIRDS_CACHE"] = str(work / "image-cache")
    anonymous = AnonymousMemoryPeak()
    seconds = {}
    started = time.perf_counter()
    table = load_test_table(folder)
    seconds["table"] = time.perf_counter() - started
    started = time.perf_counter()
    load_images(table.lr_paths, LR_SIZE)
    seconds["decode"] = time.perf_counter() - started
    started = time.perf_counter()
    ids, predictions = predict_test_set([run], folder)
    labels = predictions.labels
    write_csv(
        work / "submission.csv", pd.DataFrame({"id": ids, "label": [labels[i] for i in predictions.probs.argmax(1)]})
    )
    seconds["predict"] = time.perf_counter() - started
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate_submission(work / "submission.csv", folder / "labels.csv", folder, work, force=True)
    seconds["evaluate"] = time.perf_counter() - started
    return {
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_anon_mb": anonymous.stop(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated test-set sizes")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lowres-birds-scale",
        help="where the synthetic folders are kept between runs",
    )
    # the per-size child process
    parser.add_argument("--measure", nargs=3, metavar=("FOLDER", "RUN", "WORK"), help=argparse.SUPPRESS)
    add_record_args(parser)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*map(Path, args.measure))))
        return 0

    sizes = sorted(int(s) for s in args.sizes.split(","))
    args.cache.mkdir(parents=True, exist_ok=True)
    run = tiny_run(args.cache)
    folders = {size: synthetic_folder(args.cache, size) for size in sizes}
    machine = describe_machine("cpu")
    results = {}
    with OtherLoad() as load:
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="scale-work-") as work:
                command = [sys.executable, __file__, "--measure", str(folders[size]), str(run), work]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[size] = json.loads(output.strip().splitlines()[-1])
            per_image = {step: results[size]["seconds"][step] / size * 1e6 for step in STEPS}
            print(
                f"{size:>7} images: "
                + "  ".join(f"{s} {per_image[s]:.1f} us/img" for s in STEPS)
                + f"  peak RSS {results[size]['peak_rss_mb']:.0f} MB (anonymous {results[size]['peak_anon_mb']:.0f} "
                "MB)",
                flush=True,
            )
    small, large = sizes[0], sizes[-1]
    slope = {
        step: (results[large]["seconds"][step] / large) / (results[small]["seconds"][step] / small) for step in STEPS
    }
    rows = [
        f"| {size:,} | "
        + " | ".join(
            f"{results[size]['seconds'][s]:.2f} s ({results[size]['seconds'][s] / size * 1e6:.0f} µs/img)"
            for s in STEPS
        )
        + f" | {results[size]['peak_rss_mb']:.0f} | {results[size]['peak_anon_mb']:.0f} |"
        for size in sizes
    ]
    summary = (
        f"scale {small:,} -> {large:,} images, time per image ratio (1.0 = linear): "
        + ", ".join(f"{s} {slope[s]:.2f}" for s in STEPS)
        + f"; table loading of {large:,} rows {results[large]['seconds']['table']:.2f} s; peak RSS "
        f"{results[large]['peak_rss_mb']:.0f} MB"
        + f" (anonymous {results[small]['peak_anon_mb']:.0f} MB at {small:,}, {results[large]['peak_anon_mb']:.0f} MB "
        f"at {large:,})"
    )
    body = [
        "| test images | " + " | ".join(STEPS) + " | peak RSS MB | peak anonymous MB |",
        "|---|" + "---|" * (len(STEPS) + 2),
        *rows,
        "",
        "Each size in a fresh process with an empty image cache; the model is a small untrained timm network at 64x64 "
        "so that the pipeline, not the network, is measured.",
        "",
        f"Result: {summary}",
    ]
    record(args, "Scaling (benchmarks/scale.py)", machine, load, body)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
