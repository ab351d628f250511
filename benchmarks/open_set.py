"""Open-set benchmark: how well each unknown score tells species the run never saw from those it knows.

A run trained on part of the species (``/work/runs/cub90``: cub100-lr without 10 species) predicts the public test
images; a labels file with a ``known`` column says which belong to the trained species. For each score of
``lowres_birds.model.calibration.SCORES`` (statistics on the run's training split, temperature fitted on its
validation split, as ``calibrate`` does): AUROC of unknown-vs-known, FPR at 95 % TPR (the share of unknown images
taken for known when 95 % of the known test images are kept), and, at the threshold set on the validation split,
the share of known, unknown and non-bird photos flagged. Non-bird photos: crops of scikit-image's bundled sample
images (all public domain or CC0 per their docstrings), drawn at run time.

    python benchmarks/open_set.py --run /work/runs/cal-open90-s42 --data /work/runs/cub90 \
        --labels /work/runs/cub90/test_public_labels_open_set.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import OtherLoad, add_record_args, describe_machine, record  # noqa: E402

# scikit-image's sample images documented as public domain, CC0 or without known copyright restrictions.
SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "text",
    "retina",
    "clock",
    "horse",
    "cell",
)


def non_bird_photos() -> list[np.ndarray]:
    """Three crops (whole, centre half, top-left half) of each sample image, as uint8 H x W x 3."""
    import skimage.data

    photos = []
    for name in SKIMAGE_PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        image = image[..., :3]
        height, width = image.shape[:2]
        photos += [
            image,
            image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4],
            image[: height // 2, : width // 2],
        ]
    return photos


def main() -> None:
    import pandas as pd
    from sklearn.metrics import roc_auc_score, roc_curve

    from lowres_birds.config import LR_SIZE
    from lowres_birds.data.images import load_images
    from lowres_birds.data.splits import run_split
    from lowres_birds.data.tables import LabelMap, load_test_table
    from lowres_birds.model.calibration import (
        SCORES,
        CalibratedHead,
        feature_statistics,
        fit_temperature,
        threshold_keeping,
    )
    from lowres_birds.model.factory import load_run_model
    from lowres_birds.model.wrapper import pooled_outputs
    from lowres_birds.predict.classifier import to_model_input
    from lowres_birds.run_dir import RunDir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run trained on the known species")
    parser.add_argument("--data", type=Path, required=True, help="its data folder (test.csv, test/)")
    parser.add_argument("--labels", type=Path, required=True, help="CSV id,label,known of (some of) the test images")
    add_record_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with OtherLoad() as load, torch.no_grad():
        run = RunDir(args.run).require()
        model, labels = load_run_model(run.path)
        split = run_split(run)
        encode = LabelMap(tuple(labels)).encode
        train_targets = torch.as_tensor(encode([split.table.labels[i] for i in split.train_rows]))
        train_features, _ = pooled_outputs(model, split.lr_images(split.train_rows), "training split")
        val_features, val_logits = pooled_outputs(model, split.lr_images(split.val_rows), "validation split")
        temperature = fit_temperature(val_logits, torch.as_tensor(split.val_targets(labels)))

        table = load_test_table(args.data)
        truth = pd.read_csv(args.labels)
        position = {image_id: i for i, image_id in enumerate(table.ids)}
        rows = np.array([position[i] for i in truth["id"]])
        known = truth["known"].astype(str).str.lower().eq("true").to_numpy()
        test_images = np.asarray(load_images(table.lr_paths, LR_SIZE)[rows])
        test_features, test_logits = pooled_outputs(model, test_images, "test images")
        photos = np.stack([to_model_input(photo) for photo in non_bird_photos()])
        photo_features, photo_logits = pooled_outputs(model, photos)
        known_targets = encode(truth["label"][known].tolist())
        accuracy = float((test_logits.numpy()[known].argmax(1) == known_targets).mean())

        lines = [
            f"Run {run.path} ({len(labels)} species, temperature {temperature:.3f}); {int(known.sum())} known and "
            f"{int((~known).sum())} unknown test images, {len(photos)} non-bird photos (crops of "
            f"{len(SKIMAGE_PHOTOS)} scikit-image sample images); closed-set accuracy on the known: {accuracy:.3f}.",
            "Threshold: the validation split's 95th percentile of the score (95 % of known images kept).",
            "",
            "| score | AUROC | FPR at 95 % TPR | known flagged | unknown flagged | non-bird flagged |",
            "|---|---|---|---|---|---|",
        ]
        for score in SCORES:
            statistics = feature_statistics(score, train_features, train_targets, len(labels))
            head = CalibratedHead(temperature, score, statistics)
            threshold = threshold_keeping(head(val_features, val_logits)[1].numpy())
            test_scores = head(test_features, test_logits)[1].numpy()
            photo_scores = head(photo_features, photo_logits)[1].numpy()
            auroc = roc_auc_score(~known, test_scores)
            false_positive, true_positive, _ = roc_curve(known, -test_scores)
            fpr95 = float(false_positive[np.searchsorted(true_positive, 0.95)])
            flagged = test_scores > threshold
            lines.append(
                f"| {score} | {auroc:.3f} | {fpr95:.3f} | {flagged[known].mean():.3f} | {flagged[~known].mean():.3f} "
                f"| {(photo_scores > threshold).mean():.3f} |"
            )
    print("\n".join(lines))
    record(args, "Open set: unknown scores (benchmarks/open_set.py)", describe_machine(), load, lines)


if __name__ == "__main__":
    main()
