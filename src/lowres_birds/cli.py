"""Command line: ``lowres-birds <command>``. Exit codes: 0 success, 2 bad input or usage, 1 unexpected,
130 interrupted (after a checkpoint was saved).

Each command is a pair (``add_<name>`` builds its parser, ``run_<name>`` does the work); bad input is
raised as ``UserError`` anywhere below and printed here as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

from lowres_birds import eda, export, report, runtime, serving_cli, study
from lowres_birds.errors import TrainingInterrupted, UserError

DEFAULT_DEMO_DIR = "demo-output"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as UserError (exit 2, one line) and shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


# --------------------------------------------------------------------------- train


def _add_config_overrides(parser: argparse.ArgumentParser) -> None:
    """Every RunConfig field as a flag (--epochs, --lr, --batch-size, ...); unset flags keep the recipe's value."""
    from lowres_birds.config import RunConfig

    group = parser.add_argument_group("recipe overrides (default: the recipe's value)")
    for spec in fields(RunConfig):
        flag = "--" + spec.name.replace("_", "-")
        if spec.type == "bool":
            group.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(flag, dest=spec.name, default=None, metavar=spec.type.upper(), type=str)


def add_train(sub) -> None:
    parser = sub.add_parser("train", help="train a model on a data folder", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, help="competition folder (train.csv, train/, upscale_train/) or ImageFolder")
    parser.add_argument("--recipe", default="cpu", help="built-in recipe name or a YAML path")
    parser.add_argument("--out", type=Path, default=Path("runs/latest"), help="run folder to create")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN", help="continue RUN (or --out) from its last checkpoint")
    parser.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    _add_config_overrides(parser)


def run_train(args) -> int:
    from accelerate import PartialState

    from lowres_birds.config import FIELD_TYPES, load_config
    from lowres_birds.training import train

    started = time.perf_counter()
    overrides = {name: getattr(args, name) for name in FIELD_TYPES}
    if args.resume:
        if any(value is not None for value in overrides.values()):
            raise UserError("--resume continues the run with its saved config; drop the recipe override flags")
        run_dir = Path(args.resume) if isinstance(args.resume, str) else args.out
        result = train(None, _run_data_dir(run_dir, args.data), run_dir, resume=True)
    else:
        if args.data is None:
            raise UserError("train: --data DIR is required (the competition folder or an ImageFolder)")
        run_dir = args.out
        cfg = load_config(args.recipe, overrides)
        if cfg.folds and cfg.fold < 0:
            from lowres_birds.training import train_folds

            summary = train_folds(cfg, args.data, run_dir, force=args.force)
            folds = " ".join(f"--run {run_dir / f'fold{k}'}" for k in range(cfg.folds))
            print(f"out-of-fold macro-F1 {summary['oof_macro_f1']:.4f} over {cfg.folds} folds; predict with: lowres-birds predict {folds} --data DIR")
            return 0
        result = train(cfg, args.data, run_dir, force=args.force)
    if not PartialState().is_main_process:  # under torchrun / accelerate launch, rank 0 reports
        return 0
    print(
        f"best validation macro-F1 {result['best_val_macro_f1']:.4f} (epoch {result['best_epoch']}), "
        f"{time.perf_counter() - started:.0f}s; run folder: {run_dir}"
    )
    report.report_after_training(run_dir, args.data)
    return 0


def _run_data_dir(run_dir: Path, data_dir: Path | None) -> Path:
    """The data folder a run was trained on (saved in split.json), unless --data names another."""
    import json

    if data_dir is not None:
        return data_dir
    split = run_dir / "split.json"
    if not split.is_file():
        raise UserError(f"{run_dir} does not record its data folder; pass --data DIR")
    return Path(json.loads(split.read_text(encoding="utf-8"))["data"])


# --------------------------------------------------------------------------- predict


def add_predict(sub) -> None:
    parser = sub.add_parser("predict", help="write a submission for test.csv", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", default=[], help="trained run folder (repeat to average several runs)")
    parser.add_argument("--onnx", type=Path, action="append", default=[], help="exported ONNX model (repeatable, averaged with --run)")
    parser.add_argument("--data", type=Path, required=True, help="folder with test.csv and test/ (sample_submission.csv gives the order)")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission CSV to write")
    parser.add_argument("--probs", type=Path, help="also write per-class probabilities to this CSV")
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="test-time augmentation")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run_predict(args) -> int:
    import pandas as pd

    from lowres_birds.inference import predict_test_set, write_atomic_csv

    sources = args.run + args.onnx
    if not sources:
        raise UserError("predict: pass --run RUN (or --onnx MODEL); repeat it to average several models")
    for path in (args.out, args.probs):
        if path is not None and path.exists() and not args.force:
            raise UserError(f"{path} already exists; pass --force to overwrite it")
    ids, labels, probs = predict_test_set(sources, args.data, tta=args.tta, device=args.device)
    predicted = [labels[i] for i in probs.argmax(1)]
    write_atomic_csv(pd.DataFrame({"id": ids, "label": predicted}), args.out)
    if args.probs is not None:
        write_atomic_csv(pd.concat([pd.DataFrame({"id": ids}), pd.DataFrame(probs, columns=labels)], axis=1), args.probs)
    print(f"wrote {len(ids)} predictions to {args.out}" + (f" and probabilities to {args.probs}" if args.probs else ""))
    return 0


# --------------------------------------------------------------------------- evaluate


def add_evaluate(sub) -> None:
    parser = sub.add_parser("evaluate", help="score a submission against labels", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--submission", type=Path, required=True, help="CSV with id,label")
    parser.add_argument("--labels", type=Path, required=True, help="CSV with id,label (may cover part of the test set)")
    parser.add_argument("--data", type=Path, help="test folder: submission ids outside its test.csv are refused (default: the folder of --labels when it holds a test.csv)")
    parser.add_argument("--out-dir", type=Path, help="where to write confusion_matrix.png and per_class.csv (default: beside the submission)")


def run_evaluate(args) -> int:
    from lowres_birds.data import load_test_table
    from lowres_birds.metrics import align_submission, per_class_table, score
    from lowres_birds.plots import confusion_matrix_png

    test_dir = args.data or (args.labels.parent if (args.labels.parent / "test.csv").is_file() else None)
    test_ids = load_test_table(test_dir).ids if test_dir else None
    ids, truth, predicted = align_submission(args.submission, args.labels, test_ids)
    classes = sorted(set(truth) | set(predicted))
    result = score(truth, predicted)
    table = per_class_table(truth, predicted, classes)
    out_dir = args.out_dir or args.submission.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "per_class.csv", index=False)
    png = confusion_matrix_png(truth, predicted, classes, out_dir / "confusion_matrix.png")
    print(table.sort_values("f1").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nscored {len(ids)} labelled images over {len(classes)} classes")
    print(f"macro-F1 {result['macro_f1']:.4f}  accuracy {result['accuracy']:.4f}")
    print(f"confusion matrix: {png}; per-class table: {out_dir / 'per_class.csv'}")
    return 0


# --------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    parser = sub.add_parser("demo", help="synthetic data -> train (cpu recipe) -> predict -> evaluate, offline", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_DEMO_DIR), help="folder for the data, run and submission")
    parser.add_argument("--force", action="store_true", help="replace an existing demo folder")


def run_demo(args) -> int:
    import shutil

    from lowres_birds.config import load_config
    from lowres_birds.demo import make_demo_dataset
    from lowres_birds.training import train

    started = time.perf_counter()
    if args.out.exists() and any(args.out.iterdir()):
        if not args.force:
            raise UserError(f"{args.out} already exists; pass --force to replace it or --out to choose another folder")
        shutil.rmtree(args.out)
    data_dir = make_demo_dataset(args.out / "data")
    print(f"synthetic data set (8 drawn species, 64x64 + 256x256 twins): {data_dir}")
    # The cpu recipe as is, on fewer epochs and a smaller upscale so the whole demo fits in ~2 minutes.
    cfg = load_config("cpu", {"epochs": 4, "strategy": "upscale:96", "batch_size": 32, "warmup_epochs": 0.5})
    run_dir = args.out / "run"
    train(cfg, data_dir, run_dir)
    submission = args.out / "submission.csv"
    predict_args = argparse.Namespace(run=[run_dir], onnx=[], data=data_dir, out=submission, probs=None, tta="flip", device="cpu", force=True)
    run_predict(predict_args)
    run_evaluate(argparse.Namespace(submission=submission, labels=data_dir / "test_labels.csv", data=data_dir, out_dir=args.out))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s. Everything is in {args.out}/:")
    print(f"  data/ (synthetic)  run/ (model, config, metrics)  submission.csv  confusion_matrix.png")
    print("Real data: lowres-birds train --data DIR --recipe cpu --out runs/mine  (see README)")
    return 0


COMMANDS = {
    "train": (add_train, run_train),
    "predict": (add_predict, run_predict),
    "evaluate": (add_evaluate, run_evaluate),
    "demo": (add_demo, run_demo),
    "predict-image": (serving_cli.add_predict_image, serving_cli.run_predict_image),
    "serve": (serving_cli.add_serve, serving_cli.run_serve),
    "export": (export.add_export, export.run_export),
    "study": (study.add_study, study.run_study),
    "report": (report.add_report, report.run_report),
    "eda": (eda.add_eda, eda.run_eda),
}


def build_parser() -> argparse.ArgumentParser:
    from lowres_birds import __version__

    parser = _Parser(prog="lowres-birds", description="Train, evaluate, explain and serve classifiers for 64x64 bird photos.")
    parser.add_argument("--version", action="version", version=f"lowres-birds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _one_line_warnings(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warnings
    runtime.keep_freed_memory()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command][1](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line, traceback only on request
        if os.environ.get("LOWRES_BIRDS_DEBUG"):
            raise
        print(f"unexpected error: {type(exc).__name__}: {exc} (set LOWRES_BIRDS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
