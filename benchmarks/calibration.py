"""Calibration on a labelled test set: ECE (15 bins), NLL, macro-F1 and accuracy of each calibrated run and of their
ensemble (``predict --run A --run B``, or one ensemble folder with the weights it records: the members' weighted
plain softmax at their weighted mean temperature, ``Classifier.combine``), before and after; and, for comparison,
the weighted mean of the calibrated members.

"Before" is the same network's plain softmax: ``softmax(log p * T)`` of the calibrated probabilities ``p``, exact
since ``p = softmax(logits / T)``. Run ``lowres-birds calibrate --run RUN`` on each run first.

ECE on a few hundred images moves by itself: each "after" figure comes with a bootstrap 90 % interval (1,000
resamples of the labelled images, as many as there are). ECE is a sum of absolute gaps, so resampling adds to it:
the interval sits above the figure itself and reads as what another sample of the same size could show. Beside it,
the floor: the ECE a perfectly calibrated model with the same confidences would read on as many images (its mean,
95th percentile and how often it passes 0.03), since chance alone keeps an ECE on ~900 images near 0.02. The
last column: the share of these photos (all of known species) flagged unknown at the run's threshold, which keeps
95 % of known photos it did not train on (so ~5 % by design).

    python benchmarks/calibration.py --run /work/runs/cal-base-s42 --run /work/runs/cal-base-s43 \
        --labels ../shared/data/cub100-lr/test_public_labels.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record  # noqa: E402

TARGET = 0.03  # issue 25: ECE after calibration <= 0.03


def ece_interval(probs: np.ndarray, targets: np.ndarray, draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The 5th and 95th percentiles of the ECE over ``draws`` bootstrap resamples of the labelled images."""
    from lowres_birds.model.calibration import expected_calibration_error

    rows = np.random.default_rng(seed).integers(0, len(targets), (draws, len(targets)))
    low, high = np.percentile([expected_calibration_error(probs[i], targets[i]) for i in rows], [5, 95])
    return float(low), float(high)


def perfect_calibration_ece(probs: np.ndarray, draws: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """What a perfectly calibrated model with these confidences would read on as many images: (mean, 95th
    percentile, share above ``TARGET``) of the ECE when each answer is right with probability its confidence. ECE
    counts |accuracy - confidence| per bin, so chance alone keeps it above 0: the floor a measured ECE sits on."""
    from lowres_birds.model.calibration import binned_calibration_gap

    confidence = probs.max(1)
    right = np.random.default_rng(seed).random((draws, len(confidence))) < confidence
    eces = np.array([binned_calibration_gap(confidence, r) for r in right])
    return float(eces.mean()), float(np.percentile(eces, 95)), float((eces > TARGET).mean())


def main() -> None:
    import pandas as pd
    import torch

    from lowres_birds.config import LR_SIZE
    from lowres_birds.data.images import load_images
    from lowres_birds.data.tables import LabelMap, load_test_table
    from lowres_birds.metrics import score
    from lowres_birds.model.calibration import (
        SCORES,
        STATISTICS,
        expected_calibration_error,
        negative_log_likelihood,
    )
    from lowres_birds.predict.classifier import Classifier, average_predictions, resolve_ensemble
    from lowres_birds.run_dir import RunDir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", type=Path, action="append", required=True, help="a calibrated run (repeat), or an ensemble folder"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="its data folder (test.csv, test/)")
    parser.add_argument("--labels", type=Path, required=True, help="CSV id,label of (some of) the test images")
    parser.add_argument("--tta", choices=("none", "flip"), default="none")
    add_record_args(parser)
    args = parser.parse_args()

    with OtherLoad() as load:
        table = load_test_table(args.data)
        truth = pd.read_csv(args.labels)
        position = {image_id: i for i, image_id in enumerate(table.ids)}
        paths = [table.lr_paths[position[i]] for i in truth["id"]]
        images = np.asarray(load_images(paths, LR_SIZE))
        runs, weights = resolve_ensemble(args.run)
        before, after, temperatures, classifiers, flagged = [], [], [], [], []
        for run in runs:
            classifier = Classifier.load(run)
            classifiers.append(classifier)
            saved = RunDir(run).calibration(SCORES, STATISTICS)
            if saved is None:
                raise SystemExit(f"{run} is not calibrated: run lowres-birds calibrate --run {run}")
            temperatures.append(saved[0]["temperature"])
            probs, unknown = classifier.predict_scores(images, tta=args.tta)
            flagged.append(classifier.is_unknown(unknown))
            after.append(probs)
            logits = torch.from_numpy(np.log(np.clip(probs, 1e-30, None)).astype(np.float64)) * temperatures[-1]
            before.append(logits.softmax(-1).numpy())
        labels = classifier.labels
        targets = LabelMap(tuple(labels)).encode(truth["label"].tolist())
        rows = [
            (f"`{run}` (T = {t:.3f})", b, a, f) for run, t, b, a, f in zip(runs, temperatures, before, after, flagged)
        ]
        if len(runs) > 1:
            combined = average_predictions(classifiers, images, args.tta, weights)
            plain = np.average(before, axis=0, weights=weights)
            how = "weighted by validation macro-F1" if weights else "plain mean"
            name = f"ensemble of the {len(runs)}, {how} (as predict combines them)"
            rows.append((name, plain, combined.probs, combined.unknown))
            calibrated_mean = np.average(after, axis=0, weights=weights)
            rows.append(("the same, mean of the calibrated members (not used)", plain, calibrated_mean, None))
        lines = [
            f"{len(targets)} labelled test images ({args.labels}), TTA {args.tta}.",
            "",
            "| model | ECE before | ECE after | after: bootstrap 90 % | perfectly calibrated: mean, 95th pct, "
            f"> {TARGET} | NLL before | NLL after | macro-F1 before | macro-F1 after | accuracy | flagged unknown |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, plain, calibrated, unknown in rows:
            f1_before = score([labels[i] for i in targets], [labels[i] for i in plain.argmax(1)])
            f1_after = score([labels[i] for i in targets], [labels[i] for i in calibrated.argmax(1)])
            ece = [expected_calibration_error(p, targets) for p in (plain, calibrated)]
            nll = [negative_log_likelihood(p, targets) for p in (plain, calibrated)]
            low, high = ece_interval(calibrated, np.asarray(targets))
            floor, floor_high, above = perfect_calibration_ece(calibrated)
            lines.append(
                f"| {name} | {ece[0]:.4f} | {ece[1]:.4f} | {low:.3f}-{high:.3f} | {floor:.3f}, {floor_high:.3f}, "
                f"{above:.0%} | {nll[0]:.4f} | {nll[1]:.4f} | "
                f"{f1_before['macro_f1']:.4f} | {f1_after['macro_f1']:.4f} | {f1_after['accuracy']:.4f} | "
                f"{'' if unknown is None else f'{unknown.mean():.1%}'} |"
            )
    print("\n".join(lines))
    record(args, "Calibration on the public test labels (benchmarks/calibration.py)", describe_machine(), load, lines)


if __name__ == "__main__":
    main()
