"""The ensemble's student taught on unlabelled photos too (``--distill-images``), against the recipe's student.

An ensemble recipe's student (``OUT/student``) trained again as its folder records it, the same seed and split, with
the test images whose labels the ``--labels`` file does not hold as its unlabelled photos (so the images it is scored
on are never among them: photos of the same source, not the evaluated ones); then both students without TTA and the
ensemble on the labelled images. One paired draw per call: the seed (``--seed``, default the recorded student's)
moves both students only when the recorded one is trained again, so pass a new seed with ``--retrain-recorded``.

    python benchmarks/unlabelled_photos.py --run runs/cpu-best-s43 \
        --labels ../shared/data/cub100-lr/test_public_labels.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record

from lowres_birds.config import LR_SIZE, config_from_mapping
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_test_table
from lowres_birds.inspect.evaluate import labelled_test_images, read_labels
from lowres_birds.inspect.report import calibrate_after_training
from lowres_birds.metrics import score
from lowres_birds.predict.classifier import Classifier
from lowres_birds.run_dir import MembersDir
from lowres_birds.runtime import keep_freed_memory
from lowres_birds.train.loop import train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="an ensemble recipe's folder with OUT/student")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="its data folder (train.csv, test.csv)")
    parser.add_argument("--labels", type=Path, required=True, help="CSV id,label of some of the test images")
    parser.add_argument("--seed", type=int, help="the students' seed (default: the recorded student's)")
    parser.add_argument(
        "--retrain-recorded", action="store_true", help="train the recorded student again too (with --seed)"
    )
    parser.add_argument("--out", type=Path, help="where the students go (default: a temporary folder)")
    add_record_args(parser)
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does

    table = load_test_table(args.data)
    truth = read_labels(args.labels)
    labelled = set(truth["id"])
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-unlabelled-"))
    photos = work / "unlabelled-photos"
    photos.mkdir(parents=True, exist_ok=True)
    for image_id, path in zip(table.ids, table.lr_paths):
        link = photos / f"{image_id}{path.suffix}"
        if image_id not in labelled and not link.exists():
            link.symlink_to(path.resolve())
    recorded = config_from_mapping(MembersDir(args.run).summary()["student"], f"{args.run}, student")
    seed = recorded.seed if args.seed is None else args.seed
    split_seed = recorded.split_seed_used  # the recorded student's split, whatever the seed
    base = dataclasses.replace(recorded, seed=seed, split_seed=split_seed)
    students = {"with": work / "with-photos"}
    if args.retrain_recorded:
        students["without"] = work / "without-photos"

    with OtherLoad() as load:
        seconds = {}
        for arm, folder in students.items():
            cfg = dataclasses.replace(base, distill_images=str(photos) if arm == "with" else "").validate()
            started = time.perf_counter()
            train(cfg, args.data, folder, force=True)
            calibrate_after_training(folder, args.data)  # as `lowres-birds train` does: the folder is complete
            seconds[arm] = time.perf_counter() - started
        if not args.retrain_recorded:
            students["without"] = MembersDir(args.run).student
        _, true_labels, paths = labelled_test_images(truth, args.labels, args.data)
        images = np.asarray(load_images(paths, LR_SIZE))

        def macro_f1(model: Classifier, tta: str = "none") -> float:
            predicted = model.predict_arrays(images, tta=tta).argmax(1)
            return score(true_labels, [model.labels[i] for i in predicted])["macro_f1"]

        members = Classifier.load(args.run)
        ensemble, ensemble_plain = macro_f1(members, members.tta), macro_f1(members)
        scores = {arm: macro_f1(Classifier.load(folder)) for arm, folder in students.items()}
    line = ensemble_plain - 0.01
    body = [
        f"`{args.run}`'s student (seed {seed}, split seed {split_seed}) with and without {len(table) - len(labelled)} "
        f"unlabelled photos (the test images {args.labels.name} does not label); macro-F1 on its {len(truth)} "
        f"labelled images, without TTA:",
        "",
        "| model | macro-F1 | against ensemble - 0.01 | training |",
        "|---|---|---|---|",
        f"| the ensemble (its TTA / without) | {ensemble:.4f} / {ensemble_plain:.4f} | | |",
        *(
            f"| student {'with' if arm == 'with' else 'without'} the photos (`{students[arm]}`) | {scores[arm]:.4f} "
            f"| {scores[arm] - line:+.4f} | {f'{seconds[arm]:.0f} s' if arm in seconds else 'the recorded one'} |"
            for arm in ("without", "with")
        ),
    ]
    print("\n".join(body))
    record(args, "The student with unlabelled photos (benchmarks/unlabelled_photos.py)", describe_machine(), load, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
