"""The best model as one model: an ensemble folder (``cpu-best``) and its distilled student on a labelled test set.

Macro-F1 on the labelled test images of the ensemble (with the TTA its folder records, and without), of each member
and of the student (without TTA, and with flip); images/s of the ensemble and of the student (``Classifier``, batch
64, every test image); and the ensemble's ONNX file (its TTA inside the graph) and its int8 file against ``predict
--run OUT`` (run through the CLI): labels agreeing on every test image and the largest probability difference.

    python benchmarks/ensemble_model.py --run runs/cpu-best --labels ../shared/data/cub100-lr/test_public_labels.csv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record

from lowres_birds.cli import main as cli
from lowres_birds.config import LR_SIZE
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_test_table
from lowres_birds.metrics import score
from lowres_birds.predict.classifier import Classifier
from lowres_birds.predict.export import export_onnx
from lowres_birds.run_dir import MembersDir, model_folders
from lowres_birds.runtime import keep_freed_memory


def images_per_second(classifier: Classifier, images: np.ndarray, tta: str) -> float:
    """Every image once, batch 64, after a one-batch warm-up."""
    classifier.predict_arrays(images[:64], tta=tta)
    started = time.perf_counter()
    classifier.predict_arrays(images, tta=tta)
    return len(images) / (time.perf_counter() - started)


def main() -> int:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="an ensemble recipe's folder (with OUT/student)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="its data folder (test.csv, test/)")
    parser.add_argument("--labels", type=Path, required=True, help="CSV id,label of (some of) the test images")
    add_record_args(parser)
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does

    table = load_test_table(args.data)
    images = np.asarray(load_images(table.lr_paths, LR_SIZE))
    truth = pd.read_csv(args.labels)
    position = {image_id: i for i, image_id in enumerate(table.ids)}
    labelled = np.array([position[i] for i in truth["id"]])

    def macro_f1(probs: np.ndarray, labels: list[str]) -> float:
        return score(truth["label"].tolist(), [labels[i] for i in probs[labelled].argmax(1)])["macro_f1"]

    work = Path(tempfile.mkdtemp(prefix="bench-ensemble-"))
    with OtherLoad() as load:
        ensemble = Classifier.load(args.run)
        tta = ensemble.tta
        student_dir = MembersDir(args.run).student
        rows = []

        def add_row(name: str, model: Classifier) -> None:
            plain, flipped = model.predict_arrays(images, tta="none"), model.predict_arrays(images, tta="flip")
            rows.append(f"| {name} | {macro_f1(plain, model.labels):.4f} | {macro_f1(flipped, model.labels):.4f} |")

        add_row(f"ensemble of {len(model_folders(args.run))} (`{args.run}`, {tta} TTA recorded)", ensemble)
        for member in model_folders(args.run):
            add_row(f"member `{member.name}`", Classifier.load(member))
        student = Classifier.load(student_dir) if student_dir.is_dir() else None
        if student is not None:
            add_row(f"**student** (`{student_dir}`)", student)
        speeds = [f"ensemble with {tta} TTA {images_per_second(ensemble, images, tta):.0f} img/s"]
        if tta != "none":
            speeds.append(f"without TTA {images_per_second(ensemble, images, 'none'):.0f}")
        if student is not None:
            speeds.append(f"student without TTA {images_per_second(student, images, 'none'):.0f} img/s")

        # predict --run OUT as a user runs it, then the exported files
        submission, probs_csv = work / "submission.csv", work / "probs.csv"
        assert (
            cli(
                [
                    "predict",
                    "--run",
                    str(args.run),
                    "--data",
                    str(args.data),
                    "--out",
                    str(submission),
                    "--probs",
                    str(probs_csv),
                ]
            )
            == 0
        )
        predicted = pd.read_csv(probs_csv)[ensemble.labels].to_numpy()
        files = []
        for int8 in (False, True):
            path = export_onnx(args.run, work / f"ensemble-{'int8' if int8 else 'fp32'}.onnx", int8=int8)
            exported = Classifier.load(path).predict_arrays(images)
            agree = float((exported.argmax(1) == predicted.argmax(1)).mean())
            files.append(
                f"| {'int8 (float fallback)' if int8 else 'fp32'} | {path.stat().st_size / 1e6:.1f} MB | "
                f"{agree:.2%} ({int((exported.argmax(1) == predicted.argmax(1)).sum())} of {len(images)}) | "
                f"{np.abs(exported - predicted).max():.1e} | {macro_f1(exported, ensemble.labels):.4f} |"
            )
    body = [
        f"{len(labelled)} labelled test images ({args.labels}) of {len(images)}; macro-F1:",
        "",
        "| model | without TTA | flip TTA |",
        "|---|---|---|",
        *rows,
        "",
        f"Speed (Classifier, torch, batch 64, all {len(images)} test images): " + ", ".join(speeds) + ".",
        "",
        f"The ensemble's ONNX files ({tta} TTA inside) against `predict --run {args.run}` on all {len(images)} test "
        "images:",
        "",
        "| file | size | labels agreeing | max probability difference | macro-F1 |",
        "|---|---|---|---|---|",
        *files,
    ]
    print("\n".join(body))
    record(args, "The best model as one model (benchmarks/ensemble_model.py)", describe_machine(), load, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
