"""Command line: ``lowres-birds <command>``. Exit codes: 0 success, 2 bad input or usage, 1 unexpected,
130 interrupted (after a checkpoint was saved).

Every command's parser is here (``add_<name>``), next to the function that runs it (``run_<name>``). Only
config (no torch) is imported at start; each ``run_`` imports what it needs, so ``--help`` stays fast. Bad
input is raised as ``UserError`` anywhere below and printed here as one line. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from lowres_birds.config import (
    DEFAULT_CLIENT_TIMEOUT_S,
    DEFAULT_MAX_INFLIGHT_MB,
    DEFAULT_MAX_UPLOAD_MB,
    FIELD_TYPES,
    RunConfig,
    describe_range,
    recipe_names,
)
from lowres_birds.errors import TrainingInterrupted, UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    from lowres_birds.predict.classifier import Classifier

DEFAULT_DEMO_DIR = "demo-output"
DEFAULT_RECIPE = "cpu"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show and the help text does not already name it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as UserError (exit 2, one line), shows defaults and takes no abbreviations."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see --help)")


def number(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    """The argparse type of a numeric flag that is not a RunConfig field: a finite ``kind`` in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f"between {low:g} and {high:g}"
                if low is not None and high is not None
                else f"at least {low:g}"
                if low is not None
                else f"at most {high:g}"
            )
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def _default_out(kind: str) -> Path:
    """runs/<kind>, runs/<kind>2, ... for a command run without --out (run_dir.numbered_folder decides)."""
    from lowres_birds.run_dir import numbered_folder

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would count the folders at another moment
        raise UserError(
            f"{kind}: pass --out under torchrun / accelerate launch, so that every process names the same folder"
        )
    return numbered_folder(kind)


# --------------------------------------------------------------------------- train


def add_config_overrides(parser: argparse.ArgumentParser) -> None:
    """Every RunConfig field as a flag with its type, choices, built-in default and help; unset flags keep the recipe's
    value."""
    group = parser.add_argument_group(
        "recipe overrides (unset: the recipe's value; 'default' is RunConfig's, used when the recipe has none)"
    )
    for spec in fields(RunConfig):
        flag = "--" + spec.name.replace("_", "-")
        kind = FIELD_TYPES[spec.name]
        meta = spec.metadata
        bounds = f", {describe_range(meta)}" if meta["low"] is not None or meta["high"] is not None else ""
        # argparse %-formats help texts: a literal % (a field's "~30% slower") must be doubled
        text = f"{meta['help']} ({kind.__name__}{bounds}; default {spec.default})".replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:  # values are checked by RunConfig (the same messages for recipes and flags)
            metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else kind.__name__.upper()
            group.add_argument(flag, dest=spec.name, default=None, metavar=metavar, type=str, help=text)


def config_overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in FIELD_TYPES}


def add_train(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser("train", help="train a model on a data folder")
    parser.add_argument(
        "--data", type=Path, help="competition folder (train.csv, train/, upscale_train/) or ImageFolder"
    )
    parser.add_argument(
        "--recipe", help=f"built-in recipe ({', '.join(recipe_names())}) or a YAML path (default: {DEFAULT_RECIPE})"
    )
    parser.add_argument("--out", type=Path, help="run folder to create (default: runs/train, then runs/train2, ...)")
    parser.add_argument(
        "--resume",
        metavar="RUN",
        type=Path,
        help="continue RUN from its last checkpoint, with its saved config and data",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing run folder (only a folder this tool made)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_config_overrides(parser)


def run_train(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    if args.resume is not None:
        return _resume(args, overrides)
    from lowres_birds.config import load_config, load_members

    members = load_members(args.recipe or DEFAULT_RECIPE, overrides)
    cfg = None if members is not None else load_config(args.recipe or DEFAULT_RECIPE, overrides)
    if args.print_config:
        if members is None:
            print(cfg.to_yaml(), end="")
            return 0
        _print_members(members.ensemble, members.tta, members.members, members.student)
        return 0
    if args.data is None:
        raise UserError("train: --data DIR is required (the competition folder or an ImageFolder)")
    from lowres_birds.run_dir import replace_folder

    run_dir = args.out or _default_out("train")
    # checked now, replaced once data and model load
    unlabelled = members.student.distill_images if members is not None and members.student else None
    inputs = cfg.input_paths() if cfg is not None else [("--distill-images", unlabelled)]
    group = members is not None or bool(cfg.folds and cfg.fold < 0)
    replace_folder(run_dir, args.force, create=False, others=[("--data", args.data), *inputs], group=group)
    started = time.perf_counter()
    if members is not None:
        from lowres_birds.train.ensembles import train_members

        return _finish_members(train_members(members, args.data, run_dir, force=args.force), run_dir, started)
    if cfg.folds and cfg.fold < 0:
        from lowres_birds.inspect.report import calibrate_after_training
        from lowres_birds.train.ensembles import train_folds

        summary = train_folds(cfg, args.data, run_dir, force=args.force)
        calibrate_after_training(run_dir, args.data)
        print(
            f"out-of-fold macro-F1 {summary['oof_macro_f1']:.4f} over {cfg.folds} folds; predict with: lowres-birds "
            f"predict --run {run_dir} --ensemble f1 --data DIR"
        )
        return 0
    from lowres_birds.train.loop import train

    return _finish_training(train(cfg, args.data, run_dir, force=args.force), run_dir, args.data, started)


def _print_members(ensemble: str, tta: str, members: dict[str, RunConfig], student: RunConfig | None) -> None:
    """An ensemble recipe's configs as ``--print-config`` shows them: each member's, then the student's."""
    runs = {f"member {name}": member for name, member in members.items()}
    runs |= {"student (distilled from the members)": student} if student else {}
    print(f"# ensemble: {ensemble}, tta: {tta}")
    print("".join(f"# {name}\n{run.to_yaml()}" for name, run in runs.items()), end="")


def _resume(args: argparse.Namespace, overrides: dict) -> int:
    from lowres_birds.run_dir import MembersDir, RunDir
    from lowres_birds.train.loop import train

    given = [f"--{name.replace('_', '-')}" for name, value in overrides.items() if value is not None]
    given += [
        flag for flag, value in (("--recipe", args.recipe), ("--out", args.out), ("--force", args.force)) if value
    ]
    if given:
        raise UserError(f"--resume continues the run with its saved config, data and folder; drop {', '.join(given)}")
    if MembersDir(args.resume).is_group():
        from lowres_birds.train.ensembles import resume_members, saved_configs

        if args.print_config:
            summary = MembersDir(args.resume).summary()
            _print_members(summary["ensemble"], summary["tta"], *saved_configs(MembersDir(args.resume)))
            return 0
        started = time.perf_counter()
        return _finish_members(resume_members(args.resume, args.data), args.resume, started)
    run = RunDir(args.resume).require()
    if args.print_config:
        print(run.config().to_yaml(), end="")
        return 0
    if not run.resumable():
        raise UserError(f"{run} has no {RunDir.CHECKPOINT} to resume from; start a new run without --resume")
    started = time.perf_counter()
    data_dir = run.data_dir(args.data)
    result = train(run.config(), data_dir, run.path, resume=True, refuse_finished=True)
    return _finish_training(result, run.path, data_dir, started)


def _finish_members(summary: dict, out: Path, started: float) -> int:
    from lowres_birds.inspect.report import after_training, calibrate_after_training
    from lowres_birds.run_dir import MembersDir

    calibrate_after_training(out, None)  # each member on its own split, with the data its split.json names
    scores = ", ".join(f"{name} {score:.4f}" for name, score in summary["val_macro_f1"].items())
    print(
        f"ensemble of {len(summary['members'])} trained in {time.perf_counter() - started:.0f}s (validation macro-F1: "
        f"{scores}; weights {summary['ensemble']}, TTA {summary['tta']}); predict with: lowres-birds predict --run "
        f"{out} --data DIR"
    )
    if "student_val_macro_f1" in summary:
        student = MembersDir(out).student
        score = summary["student_val_macro_f1"]
        print(f"its student: validation macro-F1 {score:.4f}, a run folder of its own: {student}")
        after_training(student, None)
    return 0


def _finish_training(result: dict, run_dir: Path, data_dir: Path, started: float) -> int:
    from accelerate import PartialState

    from lowres_birds.inspect.report import after_training

    if not PartialState().is_main_process:  # under torchrun / accelerate launch, rank 0 reports
        return 0
    print(
        f"kept the {result['keep']} weights: validation macro-F1 {result['val_macro_f1']:.4f} (epoch "
        f"{result['kept_epoch']:g}), "
        f"{time.perf_counter() - started:.0f}s; run folder: {run_dir}"
    )
    after_training(run_dir, data_dir)
    return 0


# --------------------------------------------------------------------------- predict


def add_predict(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser(
        "predict", help="predict a test set (submission CSV) or any images (CSV of path, label, score, top-k)"
    )
    parser.add_argument(
        "--run",
        type=Path,
        action="append",
        default=[],
        help="trained run folder, folds folder (train --folds: all its fold runs) or exported Hugging Face folder "
        "(repeat to average several)",
    )
    parser.add_argument(
        "--onnx", type=Path, action="append", default=[], help="exported ONNX model (repeatable, averaged with --run)"
    )
    _add_ensemble_option(parser)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--data",
        type=Path,
        help="competition folder with test.csv and test/: writes a submission (id,label) in sample_submission.csv's "
        "order",
    )
    inputs.add_argument(
        "--images",
        metavar="DIR|GLOB",
        help="any images: a folder (searched recursively), a quoted glob such as 'photos/*.jpg', or one file",
    )
    parser.add_argument(
        "--out", type=Path, help="CSV to write (default: submission.csv with --data, predictions.csv with --images)"
    )
    parser.add_argument(
        "--top",
        type=number(int, 1),
        default=5,
        help="with --images: classes per image (columns label, score, label_2, score_2, ...)",
    )
    parser.add_argument(
        "--probs",
        type=Path,
        help="also write per-class calibrated probabilities to this CSV (with unknown, unknown_score for a calibrated "
        "run)",
    )
    _add_min_confidence_option(parser, "with --images: label is left empty")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def _add_min_confidence_option(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument(
        "--min-confidence",
        type=number(float, 0, 1),
        default=0.0,
        metavar="P",
        help=f"abstain ({where}) when the top calibrated probability is below P; the run report's risk-coverage "
        "curve shows the accuracy and the share answered at each P (default 0: always answer)",
    )


def _add_ensemble_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ensemble",
        choices=("mean", "f1"),
        help="how several models' probabilities are averaged: mean, or f1: weighted by each run's kept "
        "weights' validation macro-F1 (run folders only); default: what an ensemble recipe's folder records, else mean",
    )
    parser.add_argument(
        "--tta",
        choices=("none", "flip"),
        help="test-time augmentation (flip: each image averaged with its mirror); default: what an ensemble recipe's "
        "folder or an exported file records, else none",
    )


def _refuse_several_runs(source: Path, what: str) -> None:
    """One line naming the runs of an ensemble or folds folder given to a command that takes one run folder."""
    from lowres_birds.run_dir import MembersDir, model_folders

    runs = model_folders(source)
    if runs == [source]:
        return
    student = MembersDir(source).student if MembersDir(source).is_group() else None
    runs += [student] if student is not None and student.is_dir() else []
    raise UserError(f"{what}: {source} holds {len(runs)} runs; pass one of them ({', '.join(map(str, runs))})")


def _resolve_ensemble(
    sources: list[Path], args: argparse.Namespace
) -> tuple[list[Path], list[float] | None, str | None]:
    """The models to average, their weights and the TTA (the flags, else what one ensemble folder records, else None:
    each model's own, an ONNX file's recorded in it), announced in one line when there is more than a single model."""
    from lowres_birds.predict.classifier import describe_ensemble, resolve_ensemble
    from lowres_birds.run_dir import recorded_prediction

    members, weights = resolve_ensemble(sources, args.ensemble)
    if len(members) > 1 or weights is not None:
        print(describe_ensemble(members, weights))
    recorded = recorded_prediction(sources)["tta"]
    return members, weights, args.tta or (None if recorded == "none" else recorded)


def run_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from lowres_birds.data.tables import find_images, images_root
    from lowres_birds.predict.classifier import predict_files, predict_test_set, top_k_table
    from lowres_birds.run_dir import check_output, write_csv

    sources = args.run + args.onnx
    _refuse_onnx_without_suffix(args.onnx)
    if not sources:
        raise UserError("predict: pass --run RUN (or --onnx MODEL); repeat it to average several models")
    out = args.out or Path("submission.csv" if args.data is not None else "predictions.csv")
    inputs = [
        ("--data", args.data),
        ("--images", images_root(args.images) if args.images else None),
        *(("--run", run) for run in args.run),
        *(("--onnx", model) for model in args.onnx),
    ]
    check_output(out, args.force, others=[("--probs", args.probs), *inputs])
    if args.probs is not None:
        check_output(args.probs, args.force, others=inputs)
    if args.data is not None and args.min_confidence > 0:
        raise UserError("--min-confidence applies to --images: a submission (--data) names a species for every row")
    members, weights, tta = _resolve_ensemble(sources, args)
    if args.data is not None:
        ids, predictions = predict_test_set(members, args.data, tta=tta, device=args.device, weights=weights)
        labels = predictions.labels
        write_csv(out, pd.DataFrame({"id": ids, "label": [labels[i] for i in predictions.probs.argmax(1)]}))
        key = "id"
    else:
        paths = find_images(args.images)
        predictions = predict_files(members, paths, tta=tta, device=args.device, weights=weights)
        ids = [str(path) for path in paths]
        write_csv(out, top_k_table(ids, predictions, args.top, args.min_confidence))
        key = "path"
    if args.probs is not None:
        flags = (
            {"unknown": predictions.unknown.astype(int), "unknown_score": predictions.unknown_scores}
            if predictions.unknown is not None
            else {}
        )
        columns = [pd.DataFrame({key: ids}), pd.DataFrame(predictions.probs, columns=predictions.labels)]
        write_csv(args.probs, pd.concat([*columns, pd.DataFrame(flags)], axis=1))
    print(f"wrote {len(ids)} predictions to {out}" + (f" and probabilities to {args.probs}" if args.probs else ""))
    return 0


# --------------------------------------------------------------------------- evaluate


def add_evaluate(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="score a submission against labels, or a trained model on a labelled ImageFolder or a labelled test set",
    )
    parser.add_argument("--submission", type=Path, help="CSV with id,label (with --labels)")
    parser.add_argument(
        "--labels",
        type=Path,
        help="CSV with id,label (may cover part of the test set): scores --submission, or --run on those test images",
    )
    parser.add_argument(
        "--run",
        type=Path,
        action="append",
        default=[],
        help="instead of a submission: a trained run folder, folds folder or exported Hugging Face folder to score on "
        "--data; repeat to average",
    )
    parser.add_argument(
        "--onnx", type=Path, action="append", default=[], help="an exported ONNX model to score on --data (repeatable)"
    )
    _add_ensemble_option(parser)
    parser.add_argument(
        "--data",
        type=Path,
        help="with --run: a labelled ImageFolder (DIR/<class>/*.jpg) to predict and score, or with --labels the test "
        "folder they come from; with --submission: the test folder, whose test.csv ids the submission must cover "
        "(with --labels, default: the folder of --labels when it holds a test.csv)",
    )
    parser.add_argument(
        "--degradations",
        metavar="GRID",
        help="with one --run: score it on its validation split's HR twins made 64x64 by every cell of GRID (default: "
        "24 kernels x blur x JPEG x noise; or 'kernels=box+lanczos,blur=0+0.5,jpeg=none+50,noise=0+4') and print "
        "each cell's drop against its real LR validation images; --data: its training data (default: the one it "
        "recorded)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="with --run: where the models run")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where to write confusion_matrix.png and per_class.csv (default: beside the submission; with --run: "
        "runs/evaluate, runs/evaluate2, ...)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing per_class.csv / confusion_matrix.png")


def run_evaluate(args: argparse.Namespace) -> int:
    from lowres_birds.inspect.evaluate import evaluate_models, evaluate_submission
    from lowres_birds.run_dir import check_output

    sources = args.run + args.onnx
    _refuse_onnx_without_suffix(args.onnx)
    if args.degradations is not None:
        from lowres_birds.inspect.robustness import evaluate_robustness

        others = [flag for flag, value in (("--submission", args.submission), ("--labels", args.labels)) if value]
        if len(args.run) != 1 or args.onnx or others:
            drop = f"; drop {', '.join(others)} (it scores the run's own validation twins)" if others else ""
            raise UserError(f"evaluate --degradations scores one trained run: pass exactly one --run RUN{drop}")
        _refuse_several_runs(args.run[0], "evaluate --degradations scores one run on its own validation split")
        out_dir = args.out_dir or _default_out("evaluate")
        evaluate_robustness(
            args.run[0], args.data, args.degradations, out_dir, args.force, args.tta or "none", args.device
        )
        return 0
    beside_labels = args.labels is not None and (args.labels.parent / "test.csv").is_file()
    test_dir = args.data or (args.labels.parent if beside_labels else None)
    if sources:
        if args.submission is not None:
            raise UserError(
                "evaluate: score either models (--run/--onnx) or a submission (--submission with --labels), not both"
            )
        if test_dir is None and args.labels is not None:
            raise UserError(
                f"evaluate: no test.csv beside --labels {args.labels}; pass --data, the test folder they come from"
            )
        if test_dir is None:
            raise UserError(
                "evaluate: --run needs --data: a labelled ImageFolder (DIR/<class>/*.jpg), or a test folder in the "
                "competition layout with --labels CSV"
            )
        out_dir = args.out_dir or _default_out("evaluate")
        members, weights, tta = _resolve_ensemble(sources, args)
        evaluate_models(members, weights, test_dir, out_dir, args.force, tta, args.device, args.labels)
        return 0
    if args.submission is None or args.labels is None:
        raise UserError(
            "evaluate: pass --submission CSV --labels CSV, or --run RUN with --data IMAGEFOLDER or --labels CSV"
        )
    out_dir = args.out_dir or args.submission.parent
    check_output(out_dir, force=True, folder=True)  # a folder that may hold other files; its two files are checked next
    evaluate_submission(args.submission, args.labels, test_dir, out_dir, args.force)
    return 0


# --------------------------------------------------------------------------- demo


def _run(argv: list[str]) -> int:
    """Another command, parsed as if typed (every flag gets its default), inside this one."""
    args = build_parser().parse_args([*argv, "--force"])
    return COMMANDS[args.command][1](args)


def add_demo(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser("demo", help="synthetic data -> train (cpu recipe) -> predict -> evaluate, offline")
    parser.add_argument(
        "--out", type=Path, default=Path(DEFAULT_DEMO_DIR), help="folder for the data, run and submission"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing demo folder (only one this tool made)"
    )


def run_demo(args: argparse.Namespace) -> int:
    from lowres_birds.config import load_config
    from lowres_birds.data.demo import make_demo_dataset
    from lowres_birds.extras import missing as missing_extra
    from lowres_birds.inspect.report import after_training
    from lowres_birds.run_dir import replace_folder
    from lowres_birds.train.loop import train

    started = time.perf_counter()
    replace_folder(args.out, args.force)
    data_dir = make_demo_dataset(args.out / "data")
    print(f"synthetic data set (8 drawn species, 64x64 + 256x256 twins): {data_dir}")
    # The cpu recipe as is (its HR teacher included), on fewer epochs and smaller sizes so the demo fits in ~30 s.
    cfg = load_config(
        "cpu",
        {
            "epochs": 4,
            "strategy": "upscale:96",
            "batch_size": 32,
            "warmup_epochs": 0.5,
            "budget_minutes": 0,
            "teacher_size": 96,
        },
    )
    run_dir = args.out / "run"
    train(cfg, data_dir, run_dir)
    # as train does: calibrated scores with an unknown flag, RUN/hf, and the report where its extra is installed
    with_report = not missing_extra("report")
    after_training(run_dir, data_dir, report=with_report)
    submission = args.out / "submission.csv"
    _run(["predict", "--run", str(run_dir), "--data", str(data_dir), "--out", str(submission), "--tta", "flip"])
    _run(["evaluate", "--submission", str(submission), "--labels", str(data_dir / "test_labels.csv")])
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s. Everything is in {args.out}/:")
    written = "calibration, hf/, report/" if with_report else "calibration, hf/"
    print(f"  data/ (synthetic)  run/ (model, config, metrics, {written})  submission.csv  confusion_matrix.png")
    print("Real data: lowres-birds train --data DIR --recipe cpu --out runs/mine  (see README)")
    return 0


# --------------------------------------------------------------------------- predict-image, serve, export


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        type=Path,
        help="trained run folder, ensemble or folds folder (its runs as one model) or a folder written by export "
        "--format hf",
    )
    parser.add_argument("--onnx", type=Path, help="exported ONNX model (instead of --run)")
    parser.add_argument(
        "--tta",
        choices=("none", "flip"),
        help="test-time augmentation on every photo (flip: averaged with its mirror); default: what the model "
        "records (an ensemble recipe's folder, an exported file), else none",
    )


def _refuse_onnx_without_suffix(paths: list[Path]) -> None:
    """An --onnx file is told from a run folder by its .onnx suffix (as Classifier.load tells them)."""
    for path in paths:
        if Path(path).suffix != ".onnx":
            raise UserError(f"--onnx {path}: an ONNX file's name must end in .onnx; rename it, or pass --run RUN")


def _load_classifier(args: argparse.Namespace, shares_cpu: bool = False) -> Classifier:
    from lowres_birds.predict.classifier import Classifier

    if (args.run is None) == (args.onnx is None):
        raise UserError(f"{args.command}: pass exactly one of --run RUN or --onnx MODEL")
    _refuse_onnx_without_suffix([args.onnx] if args.onnx else [])
    return Classifier.load(args.run or args.onnx, shares_cpu=shares_cpu, tta=args.tta)


def add_predict_image(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser("predict-image", help="top species for one or more photos (or folders of them)")
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="photos of any size (reduced to 64x64 as in training), or folders searched for them",
    )
    _add_model_options(parser)
    parser.add_argument("--top", type=number(int, 1), default=5, help="how many species to list per photo")
    _add_min_confidence_option(parser, "'not sure'; JSON label null")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_predict_image(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from lowres_birds.data.tables import find_images
    from lowres_birds.predict.classifier import to_model_input
    from lowres_birds.progress import bar

    classifier = _load_classifier(args)
    paths = [found for path in args.paths for found in (find_images(path) if path.is_dir() else [path])]
    shown = bar(paths, desc=f"decoding {len(paths)} images", total=len(paths)) if len(paths) > 1 else paths
    images = np.stack([to_model_input(path) for path in shown])  # every file is checked before any output
    probs, unknown = classifier.predict_scores(
        images, progress=f"predicting {len(paths)} images" if len(paths) > 1 else None
    )
    scores = [None] * len(paths) if unknown is None else unknown
    answers = [
        {"path": str(path), **classifier.answer(row, score, args.top, args.min_confidence)}
        for path, row, score in zip(paths, probs, scores)
    ]
    if args.json:
        print(json.dumps(answers, indent=2))
        return 0
    width = max(len(best["label"]) for answer in answers for best in answer["top"])
    for answer in answers:
        verdict = (
            "not one of the species I know"
            if answer.get("unknown")
            else f"not sure (below --min-confidence {args.min_confidence:g})"
            if answer["label"] is None
            else ""
        )
        score = f" (unknown score {answer['unknown_score']:.4g})" if "unknown_score" in answer else ""
        print(f"{answer['path']}{': ' + verdict if verdict else ''}{score}")
        for rank, best in enumerate(answer["top"], 1):
            print(f"  {rank:>2}. {best['label']:<{width}}  {best['probability']:6.1%}")
    return 0


def add_serve(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser("serve", help="web page and JSON API for a trained model")
    _add_model_options(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 exposes it to the network; there is no authentication)",
    )
    parser.add_argument("--port", type=number(int, 0, 65535), default=8000, help="TCP port (0 picks a free one)")
    parser.add_argument(
        "--max-upload-mb",
        type=number(float, 0.001),
        default=DEFAULT_MAX_UPLOAD_MB,
        help="largest request body accepted (one photo, or a whole batch)",
    )
    parser.add_argument(
        "--max-inflight-mb",
        type=number(float, 0.001),
        default=DEFAULT_MAX_INFLIGHT_MB,
        help="request bodies of all clients together; uploads beyond it get 503 (at least --max-upload-mb)",
    )
    parser.add_argument(
        "--client-timeout-s",
        type=number(float, 0.1, 3600),
        default=DEFAULT_CLIENT_TIMEOUT_S,
        help="drop a client that sends nothing for this long: before its request is complete, between body chunks, or "
        "idle between requests",
    )


def run_serve(args: argparse.Namespace) -> int:
    from lowres_birds.extras import require

    require("serve", "serve")
    from lowres_birds.predict.serving import bind, create_app, http_server

    if args.max_inflight_mb < args.max_upload_mb:
        raise UserError(
            f"serve: --max-inflight-mb ({args.max_inflight_mb:g}) must be at least --max-upload-mb "
            f"({args.max_upload_mb:g})"
        )
    app = create_app(
        _load_classifier(args, shares_cpu=True),
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_inflight_bytes=int(args.max_inflight_mb * 2**20),
        client_timeout_s=args.client_timeout_s,
    )
    listener = bind(args.host, args.port)
    host, port = listener.getsockname()[:2]
    print(f"serving {args.run or args.onnx} on http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    http_server(app, args.client_timeout_s).run(sockets=[listener])
    return 0


def add_export(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser(
        "export", help="export a trained run as a self-contained ONNX model or a Hugging Face folder"
    )
    parser.add_argument(
        "--run",
        type=Path,
        required=True,
        help="trained run folder (with model.safetensors), or for onnx an ensemble or folds folder: every run in one "
        "file",
    )
    parser.add_argument(
        "--tta",
        choices=("none", "flip"),
        help="onnx: test-time augmentation inside the graph (flip: each image averaged with its mirror), recorded in "
        "the file; default: what an ensemble recipe's folder records, else none",
    )
    parser.add_argument(
        "--format",
        choices=("onnx", "hf"),
        default="onnx",
        help="onnx: one .onnx file (uint8 pixels in); hf: a folder for transformers.pipeline / timm (config.json, "
        "model.safetensors, preprocessing, model card)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="file (onnx; default model.onnx) or folder (hf; default runs/hf, runs/hf2, ...) to write",
    )
    parser.add_argument(
        "--layout",
        choices=("nhwc", "nchw"),
        default="nhwc",
        help="input layout: N x 64 x 64 x 3 (nhwc) or N x 3 x 64 x 64 (nchw), uint8",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="static int8 quantization calibrated on the run's training images (faster on CPUs; see BENCHMARKS.md)",
    )
    parser.add_argument(
        "--fallback-margin",
        type=number(float, 0, 1),
        help="with --int8: images whose top-2 int8 probabilities are closer than this are run again in float, inside "
        "the file "
        "(0: int8 alone; default: calibrated on the run's validation split)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="with --int8: the run's training data, where its images are calibrated (default: the folder it was "
        "trained on, as split.json records it)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run_export(args: argparse.Namespace) -> int:
    from lowres_birds.progress import working
    from lowres_birds.run_dir import check_output

    if args.format == "hf":
        from lowres_birds.predict.hf_folder import write_hf_folder
        from lowres_birds.run_dir import FoldsDir, MembersDir, model_folders

        onnx_only = {
            "--tta": args.tta,
            "--int8": args.int8 or None,
            "--layout": None if args.layout == "nhwc" else args.layout,
            "--fallback-margin": args.fallback_margin,
            "--data": args.data,
        }
        given = [flag for flag, value in onnx_only.items() if value is not None]
        if given:
            raise UserError(
                f"export: {', '.join(given)} applies to --format onnx; a Hugging Face folder is one plain float model "
                "taking images through its preprocessing config"
            )
        if MembersDir(args.run).is_group() or FoldsDir(args.run).is_group():
            student = MembersDir(args.run).student
            one = f"its student ({student}) or one of its runs" if student.is_dir() else "one of its runs"
            raise UserError(
                f"export: {args.run} is an ensemble of {len(model_folders(args.run))} runs and a Hugging Face folder "
                f"holds one model: export {one}, or use --format onnx (every run in one file)"
            )
        out = args.out or _default_out("hf")
        with working(f"writing a Hugging Face folder to {out}"):
            folder = write_hf_folder(args.run, out, force=args.force)
        print(
            f"wrote {folder}/ (config.json, model.safetensors, README.md): "
            f"transformers.pipeline('image-classification', model='{folder}')"
        )
        return 0
    from lowres_birds.extras import require

    require("onnx", "export --format onnx")
    from lowres_birds.predict.export import export_onnx, file_metadata

    for flag, value in (("--fallback-margin", args.fallback_margin), ("--data", args.data)):
        if value is not None and not args.int8:
            raise UserError(f"export: {flag} applies to --int8 exports only; add --int8 or drop it")
    out = args.out or Path("model.onnx")
    check_output(out, args.force, others=[("--run", args.run)])
    precision = "int8" if args.int8 else "fp32"
    with working(f"exporting {args.run} to {precision} ONNX (about a minute on 2 cores)"):
        path = export_onnx(
            args.run,
            out,
            args.layout,
            int8=args.int8,
            fallback_margin=args.fallback_margin,
            tta=args.tta,
            data_dir=args.data,
        )
    if args.int8 and args.fallback_margin != 0:
        precision += f", float fallback below a top-2 margin of {file_metadata(path)['fallback_margin']}"
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {precision}): uint8 {args.layout.upper()} 64x64 RGB in, "
        "probabilities out"
    )
    return 0


# --------------------------------------------------------------------------- study, report, eda


def add_study(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser("study", help="compare resolution strategies (or recipes) on one validation split")
    parser.add_argument(
        "--data", type=Path, required=True, help="competition folder (train.csv, train/, upscale_train/)"
    )
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe shared by all strategies")
    parser.add_argument(
        "--recipes",
        help="comma-separated recipes to compare (replaces --recipe); each keeps its own strategy unless --strategies "
        "is given, all take the first recipe's seed, validation fraction and budget",
    )
    parser.add_argument(
        "--strategies",
        help="comma-separated strategies, e.g. native,upscale:224,upscale:256,hr-downscale:64 (default: the recipe's)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="study folder: one run folder per row, results.* and study.html; pass the same --out to continue an "
        "interrupted study (default: runs/study, runs/study2, ...)",
    )
    parser.add_argument("--force", action="store_true", help="retrain runs that already exist in --out")
    parser.add_argument(
        "--note", default="", help="sentence put before the table, e.g. how sizes were adapted to the hardware"
    )
    add_config_overrides(parser)


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"study: empty list {text!r}; give comma-separated names")
    return items


def run_study(args: argparse.Namespace) -> int:
    from lowres_birds.inspect.study import run_study as study
    from lowres_birds.run_dir import check_output

    out = args.out or _default_out("study")
    check_output(out, force=True, folder=True, others=[("--data", args.data)])  # --force is about the runs inside
    recipes = _split_list(args.recipes) or [args.recipe]
    if args.out is None:
        print(f"study folder: {out} (if interrupted, continue with --out {out})")
    study(recipes, _split_list(args.strategies), config_overrides(args), args.data, out, args.force, args.note)
    return 0


def add_report(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser("report", help="figures and an HTML page for a trained run")
    parser.add_argument("--run", type=Path, required=True, help="run folder written by lowres-birds train")
    parser.add_argument("--data", type=Path, help="data folder the run was trained on (default: the one in split.json)")
    parser.add_argument("--out", type=Path, help="folder for the figures and report.html (default: RUN/report)")
    parser.add_argument(
        "--force", action="store_true", help="overwrite files of the same names in --out (an earlier report's are)"
    )


def run_report(args: argparse.Namespace) -> int:
    from lowres_birds.inspect.report import REPORT_FILES, write_report
    from lowres_birds.run_dir import RunDir, check_folder_files, check_output

    _refuse_several_runs(args.run, "report: a report covers one run")
    run = RunDir(args.run).require()
    out = args.out or run / RunDir.REPORT
    data_dir = run.data_dir(args.data)
    # a report is rewritten in place; other files of the same names are not
    check_output(out, force=True, folder=True, others=[("--run", run.path), ("--data", data_dir)])
    check_folder_files(out, REPORT_FILES, "report.html", args.force)
    page, summary = write_report(run.path, data_dir, out)
    print(summary)
    print(f"report: {page}")
    return 0


def add_calibrate(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser(
        "calibrate",
        help="fit a trained run's temperature and unknown threshold (train does this itself; for older runs)",
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="run folder written by lowres-birds train (or an ensemble/folds folder)"
    )
    parser.add_argument("--data", type=Path, help="data folder the run was trained on (default: the one in split.json)")
    parser.add_argument(
        "--score",
        help="the unknown score: max_softmax, max_logit, energy, mahalanobis or knn (default: mahalanobis, chosen on "
        "the open-set benchmark; energy for models without pooled features)",
    )
    parser.add_argument(
        "--tta",
        choices=("none", "flip"),
        help="fit on the outputs of this test-time augmentation (flip: each image averaged with its mirror); default: "
        "what an ensemble recipe's folder records, else none",
    )


def run_calibrate(args: argparse.Namespace) -> int:
    from lowres_birds.inspect.report import write_run_hf_folder
    from lowres_birds.predict.calibrate import calibrate, describe
    from lowres_birds.run_dir import RunDir

    for run, calibration in calibrate(args.run, args.data, args.score, args.tta):
        print(describe(run, calibration))
        if (run / RunDir.HF).is_dir():  # its temperature and unknown threshold are folded into RUN/hf
            write_run_hf_folder(run)
    return 0


def add_eda(sub: argparse._SubParsersAction[_Parser]) -> None:
    parser = sub.add_parser("eda", help="class balance, image statistics and data-quality checks")
    parser.add_argument(
        "--data", type=Path, required=True, help="competition folder (train.csv, test.csv, ...) or ImageFolder"
    )
    parser.add_argument("--out", type=Path, default=Path("eda"), help="folder for the figures, CSV tables and eda.html")
    parser.add_argument(
        "--phash-distance",
        type=number(int, 0, 64),
        default=4,
        help="train/test pairs within this pHash Hamming distance (of 64 bits) count as near-duplicates",
    )
    parser.add_argument(
        "--twin-psnr",
        type=number(float, 0, 100),
        default=20.0,
        help="LR/HR twins below this PSNR (dB) count as mismatched",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite files of the same names in --out (an earlier eda's are)"
    )


def run_eda(args: argparse.Namespace) -> int:
    from lowres_birds.inspect.eda import EDA_FILES, write_eda
    from lowres_birds.run_dir import check_folder_files, check_output

    # eda rewrites its own files in place; other files of the same names are not
    check_output(args.out, force=True, folder=True, others=[("--data", args.data)])
    check_folder_files(args.out, EDA_FILES, "eda.html", args.force)
    write_eda(args.data, args.out, args.phash_distance, args.twin_psnr)
    return 0


COMMANDS = {
    "train": (add_train, run_train),
    "predict": (add_predict, run_predict),
    "evaluate": (add_evaluate, run_evaluate),
    "demo": (add_demo, run_demo),
    "predict-image": (add_predict_image, run_predict_image),
    "serve": (add_serve, run_serve),
    "export": (add_export, run_export),
    "study": (add_study, run_study),
    "report": (add_report, run_report),
    "calibrate": (add_calibrate, run_calibrate),
    "eda": (add_eda, run_eda),
}


def build_parser() -> argparse.ArgumentParser:
    from lowres_birds import __version__

    parser = _Parser(
        prog="lowres-birds", description="Train, evaluate, explain and serve classifiers for 64x64 bird photos."
    )
    parser.add_argument("--version", action="version", version=f"lowres-birds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _one_line_warnings(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    from lowres_birds import runtime

    warnings.formatwarning = _one_line_warnings
    # PIL's decompression-bomb warning: decode_image refuses such images itself, in one line.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
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
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say, and no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line, traceback only on request
        if os.environ.get("LOWRES_BIRDS_DEBUG"):
            raise
        print(
            f"unexpected error: {type(exc).__name__}: {exc} (set LOWRES_BIRDS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
