"""The reliability corpus: every command against every kind of output path, numeric flag and damaged run-folder
file, generated from the tables below, plus writes that fail on a full disk.

A refused case exits 2 with exactly one ``error:`` line naming the file or flag, prints no traceback, changes
nothing under its working folder (a refused output is refused before any work starts) and leaves no temporary
file (``.*.tmp``) in any run, output or cache folder. An accepted case exits 0 and writes what it should.

Corpus size (test_the_stated_corpus_size_is_true recomputes it from the tables):

    output paths       53 cases, 40 refused / 13 accepted: 9 outputs (train --out, predict --out, predict --probs,
                       evaluate --out-dir, demo --out, export --out, study --out, report --out, eda --out) x 6 kinds
                       (existing file, existing folder, missing parent, parent is a file, unwritable (/proc), same
                       path as an input or another output), less demo x same path (demo takes no other path)
    numeric flags     319 cases, 289 refused / 30 accepted: every numeric flag x (nan, inf, negative, zero, out of
                       range): the 33 numeric RunConfig fields through train (and through study, refused values
                       only: an accepted one would train), predict-image --top / --min-confidence, predict
                       --min-confidence, serve --port / --max-upload-mb /
                       --max-inflight-mb / --client-timeout-s, eda --phash-distance / --twin-psnr, export
                       --fallback-margin
    run-folder files  289 cases, 272 refused / 17 accepted: each file a command reads x (missing, empty, truncated,
                       garbage, tampered in 1-5 ways), for predict, predict-image, export, serve, report,
                       calibrate and train --resume, plus one case per command where every file it does not read
                       is garbage
    full disk           6 cases: train at model.safetensors, checkpoint.pt and metrics.jsonl, export at the
                       write and at the rename, and train at a later checkpoint: each is one line and exit 2, the
                       run is refused in one line or resumed with each epoch recorded once

Commands without the category: predict-image and serve write no file; evaluate, demo, export and report take no
numeric flag (predict: --min-confidence alone); evaluate, demo, eda and study read no run folder (study reuses its
own runs through train --resume). val_predictions.npz and degradation.json are read by no command here.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import io
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lowres_birds.cli import main
from lowres_birds.config import FIELD_TYPES, FIELDS
from lowres_birds.data.demo import make_demo_dataset

FAST = [
    "--model",
    "timm:test_efficientnet",
    "--no-pretrained",
    "--device",
    "cpu",
    "--epochs",
    "1",
    "--batch-size",
    "16",
]
UNWRITABLE = Path("/proc")  # root may write anywhere else; nothing can be created here


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """2 species x 4 training images, a finished fast run on them, its submission and one photo: read-only."""
    os.environ["LOWRES_BIRDS_CACHE"] = str(tmp_path_factory.getbasetemp() / "image-cache")
    root = tmp_path_factory.mktemp("corpus")
    data = make_demo_dataset(root / "data", train_per_class=4, test_per_class=2, classes=2)
    run, submission = root / "run", root / "submission.csv"
    assert main(["train", "--data", str(data), "--out", str(run), *FAST, "--strategy", "native"]) == 0
    assert main(["predict", "--run", str(run), "--data", str(data), "--out", str(submission)]) == 0
    photo = sorted((data / "test").glob("*.jpg"))[0]
    return SimpleNamespace(
        root=root, data=data, run=run, submission=submission, labels=data / "test_labels.csv", photo=photo
    )


# --------------------------------------------------------------------------- the checks every case shares


def run_cli(argv: list, capfd) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, *fragments: str) -> None:
    """Exit 2, one 'error:' line containing every fragment, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def assert_refused_after_progress(code: int, err: str, *fragments: str) -> None:
    """As assert_refused, for a failure during training: the epoch progress bar may come before the one error line."""
    segments = [segment.strip() for segment in re.split(r"[\r\n]", err) if segment.strip()]
    assert code == 2 and segments and "Traceback" not in err, err
    assert all(re.match(r"epoch \d+/\d+", segment) for segment in segments[:-1]), err
    assert_refused(code, segments[-1], *fragments)


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*.tmp")]


def assert_no_temporaries(*folders: Path) -> None:
    cache = Path(os.environ["LOWRES_BIRDS_CACHE"])
    assert temporaries(*folders, cache) == []


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its bytes: a refused command must leave it as it was."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def copy_run(world, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world.run, tmp_path / "run"))


def copy_data(world, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world.data, tmp_path / "data"))


@pytest.fixture
def no_server(monkeypatch):
    """`serve` loads, checks and binds as usual, then returns instead of serving."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)


@pytest.fixture
def fast_demo(monkeypatch):
    """`demo` with a 2-species data set and the fast model, so an accepted demo takes seconds."""
    import functools

    import lowres_birds.data.demo
    import lowres_birds.train.loop

    train = lowres_birds.train.loop.train
    fast = {"model": "timm:test_efficientnet", "pretrained": False, "strategy": "native", "epochs": 1, "batch_size": 16}
    monkeypatch.setattr(
        lowres_birds.train.loop,
        "train",
        lambda cfg, *args, **kwargs: train(dataclasses.replace(cfg, **fast), *args, **kwargs),
    )
    monkeypatch.setattr(
        lowres_birds.data.demo,
        "make_demo_dataset",
        functools.partial(make_demo_dataset, train_per_class=4, test_per_class=2, classes=2),
    )


# --------------------------------------------------------------------------- output paths

OK = None  # the case is accepted

KINDS = ("existing-file", "existing-folder", "missing-parent", "parent-is-file", "unwritable", "same-path")


@dataclasses.dataclass(frozen=True)
class Output:
    argv: Callable  # (world, out, tmp) -> the command line writing to ``out``
    folder: bool
    product: str  # what an accepted case writes, relative to ``out`` ("" = ``out`` itself)
    work: str  # "module:function" that does the work: a refused output must be refused before it is called
    same: Callable | None  # (world, tmp) -> (command line whose output is also one of its other paths, that flag)
    expected: dict[str, str | None]  # kind -> a fragment of the one error line, or OK
    suffix: str = ""


def _train(w, out, tmp):
    return ["train", "--data", w.data, "--out", out, *FAST, "--strategy", "native"]


def _predict(w, out, tmp):
    return ["predict", "--run", w.run, "--data", w.data, "--out", out]


def _probs(w, out, tmp):
    return ["predict", "--run", w.run, "--data", w.data, "--out", tmp / "submission.csv", "--probs", out]


def _probs_same(w, tmp):
    model = tmp / "model.onnx"
    model.write_text("an ONNX model the user keeps")
    return ["predict", "--onnx", model, "--data", w.data, "--out", tmp / "s.csv", "--probs", model, "--force"], "--onnx"


def _evaluate(w, out, tmp):
    return ["evaluate", "--submission", w.submission, "--labels", w.labels, "--data", w.data, "--out-dir", out]


def _evaluate_same(w, tmp):
    submission = Path(shutil.copy(w.submission, tmp / "per_class.csv"))
    return [
        "evaluate",
        "--submission",
        submission,
        "--labels",
        w.labels,
        "--data",
        w.data,
        "--out-dir",
        tmp,
        "--force",
    ], "--submission"


def _study(w, out, tmp, data=None):
    return ["study", "--data", data or w.data, "--strategies", "native", "--out", out, *FAST]


def _eda(w, out, tmp):
    return ["eda", "--data", w.data, "--out", out]


FILE_OUTPUT = {
    "existing-file": "already exists; pass --force",
    "existing-folder": "is a folder, not a file",
    "missing-parent": OK,
    "parent-is-file": "is a file, not a folder",
    "unwritable": "is not writable",
    "same-path": "is also given as",
}
FOLDER_OUTPUT = {**FILE_OUTPUT, "existing-file": "is a file, not a folder", "existing-folder": OK}
REPLACED_FOLDER = {
    **FOLDER_OUTPUT,
    "existing-folder": "not a lowres-birds output folder",
    "same-path": "not a lowres-birds output folder",
}

OUTPUTS = {
    "train --out": Output(
        _train,
        True,
        "model.safetensors",
        "lowres_birds.train.loop:train",
        lambda w, tmp: (["train", "--data", copy_data(w, tmp), "--out", tmp / "data", "--force", *FAST], "--data"),
        REPLACED_FOLDER,
    ),
    "predict --out": Output(
        _predict,
        False,
        "",
        "lowres_birds.predict.classifier:predict_test_set",
        lambda w, tmp: ([*_predict(w, tmp / "s.csv", tmp), "--probs", tmp / "s.csv"], "--probs"),
        FILE_OUTPUT,
        ".csv",
    ),
    "predict --probs": Output(
        _probs, False, "", "lowres_birds.predict.classifier:predict_test_set", _probs_same, FILE_OUTPUT, ".csv"
    ),
    "evaluate --out-dir": Output(
        _evaluate,
        True,
        "per_class.csv",
        "lowres_birds.inspect.evaluate:align_submission",
        _evaluate_same,
        FOLDER_OUTPUT,
    ),
    "demo --out": Output(
        lambda w, out, tmp: ["demo", "--out", out],
        True,
        "submission.csv",
        "lowres_birds.data.demo:make_demo_dataset",
        None,
        {k: v for k, v in REPLACED_FOLDER.items() if k != "same-path"},
    ),
    "export --out": Output(
        lambda w, out, tmp: ["export", "--run", w.run, "--out", out],
        False,
        "",
        "lowres_birds.predict.export:export_onnx",
        lambda w, tmp: (["export", "--run", w.run, "--out", w.run], "--run"),
        FILE_OUTPUT,
        ".onnx",
    ),
    "study --out": Output(
        _study,
        True,
        "results.csv",
        "lowres_birds.inspect.study:run_study",
        lambda w, tmp: (_study(w, tmp / "data", tmp, copy_data(w, tmp)), "--data"),
        FOLDER_OUTPUT,
    ),
    "report --out": Output(
        lambda w, out, tmp: ["report", "--run", w.run, "--out", out],
        True,
        "report.html",
        "lowres_birds.inspect.report:write_report",
        lambda w, tmp: (["report", "--run", copy_run(w, tmp), "--out", tmp / "run"], "--run"),
        FOLDER_OUTPUT,
    ),
    "eda --out": Output(
        _eda,
        True,
        "eda.html",
        "lowres_birds.inspect.eda:write_eda",
        lambda w, tmp: (["eda", "--data", copy_data(w, tmp), "--out", tmp / "data"], "--data"),
        FOLDER_OUTPUT,
    ),
}
OUTPUT_CASES = [(name, kind) for name, output in OUTPUTS.items() for kind in KINDS if kind in output.expected]


def output_path(kind: str, output: Output, tmp: Path) -> Path:
    """The output path of one kind, with whatever must exist for it made under ``tmp``."""
    name = "out" + output.suffix
    if kind == "existing-file":
        (tmp / name).write_text("keep me")
    elif kind == "existing-folder":
        (tmp / name).mkdir()
        (tmp / name / "keep.txt").write_text("keep me")
    elif kind == "parent-is-file":
        (tmp / "file.txt").write_text("keep me")
        return tmp / "file.txt" / name
    elif kind == "missing-parent":
        return tmp / "new" / "deeper" / name
    elif kind == "unwritable":
        return UNWRITABLE / f"lowres-birds-corpus-{name}"
    return tmp / name


@pytest.mark.parametrize(("name", "kind"), OUTPUT_CASES, ids=[f"{n}-{k}".replace(" ", "") for n, k in OUTPUT_CASES])
def test_output_path(name, kind, world, tmp_path, capfd, monkeypatch, fast_demo):
    output = OUTPUTS[name]
    if kind == "same-path":
        argv, flag = output.same(world, tmp_path)
    else:
        out = output_path(kind, output, tmp_path)
        argv = output.argv(world, out, tmp_path)
    expected = output.expected[kind]
    if expected is not OK:
        module, function = output.work.split(":")

        def work_started(*args, **kwargs):
            raise AssertionError(f"{name}: work started before the output {kind} was refused")

        monkeypatch.setattr(importlib.import_module(module), function, work_started)
    before = snapshot(tmp_path)
    code, _, err = run_cli(argv, capfd)
    if expected is OK:
        assert code == 0, err
        assert (out / output.product if output.product else out).is_file()
    else:
        assert_refused(code, err, expected + (f" {flag}" if kind == "same-path" and "also given" in expected else ""))
        assert snapshot(tmp_path) == before
    assert_no_temporaries(tmp_path, world.root)


# --------------------------------------------------------------------------- numeric flags

NUMERIC_KINDS = ("nan", "inf", "negative", "zero", "out-of-range")


def config_values(name: str) -> dict[str, str]:
    """The five kinds of value for one RunConfig field; out of range is past its upper bound, else below its lower one
    (left out where that is already the negative or zero case)."""
    meta = FIELDS[name].metadata
    values = {"nan": "nan", "inf": "inf", "negative": "-1", "zero": "0"}
    if meta["high"] is not None:
        values["out-of-range"] = f"{meta['high'] + 1:g}"
    elif meta["low"] is not None and meta["low"] - 1 not in (-1, 0):
        values["out-of-range"] = f"{meta['low'] - 1:g}"
    return values


def config_accepts(name: str, text: str) -> bool:
    """Written from the field's declared type and range, independently of config.check_value."""
    value, meta = float(text), FIELDS[name].metadata
    if not math.isfinite(value) or (FIELD_TYPES[name] is int and not value.is_integer()):
        return False
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        return False
    return not (high is not None and (value > high or (meta["high_open"] and value == high)))


NUMERIC_FIELDS = [name for name, kind in FIELD_TYPES.items() if kind in (int, float)]
CONFIG_CASES = [
    (command, name, kind, value)
    for command in ("train", "study")
    for name in NUMERIC_FIELDS
    for kind, value in config_values(name).items()
    if command == "train" or not config_accepts(name, value)
]

# Numeric flags that are not RunConfig fields: (command, flag) -> {kind: (value, accepted)}.
REFUSED_FOUR = {"nan": ("nan", False), "inf": ("inf", False), "negative": ("-1", False)}
CLI_NUMBERS = {
    ("predict-image", "--min-confidence"): {**REFUSED_FOUR, "zero": ("0", True), "out-of-range": ("1.5", False)},
    ("predict", "--min-confidence"): {**REFUSED_FOUR, "zero": ("0", True), "out-of-range": ("1.5", False)},
    ("predict-image", "--top"): {
        **REFUSED_FOUR,
        "zero": ("0", False),
        "out-of-range": ("1000000", True),
    },  # no upper bound: every class
    ("serve", "--port"): {**REFUSED_FOUR, "zero": ("0", True), "out-of-range": ("70000", False)},
    ("serve", "--max-upload-mb"): {
        **REFUSED_FOUR,
        "zero": ("0", False),
        "out-of-range": ("1000", False),
    },  # above --max-inflight-mb
    ("serve", "--max-inflight-mb"): {
        **REFUSED_FOUR,
        "zero": ("0", False),
        "out-of-range": ("5", False),
    },  # below --max-upload-mb
    ("serve", "--client-timeout-s"): {**REFUSED_FOUR, "zero": ("0", False), "out-of-range": ("4000", False)},
    ("eda", "--phash-distance"): {**REFUSED_FOUR, "zero": ("0", True), "out-of-range": ("65", False)},
    ("eda", "--twin-psnr"): {**REFUSED_FOUR, "zero": ("0", True), "out-of-range": ("101", False)},
    ("export", "--fallback-margin"): {
        **REFUSED_FOUR,
        "zero": ("0", True),
        "out-of-range": ("1.5", False),
    },  # 0: int8 alone
}
CLI_CASES = [
    (command, flag, kind, value, accepted)
    for (command, flag), values in CLI_NUMBERS.items()
    for kind, (value, accepted) in values.items()
]
NUMERIC_CASES = len(CONFIG_CASES) + len(CLI_CASES)


@pytest.mark.parametrize(
    ("command", "name", "kind", "value"), CONFIG_CASES, ids=[f"{c}-{n}-{k}" for c, n, k, _ in CONFIG_CASES]
)
def test_config_number(command, name, kind, value, world, tmp_path, capfd):
    flag = "--" + name.replace("_", "-")
    if command == "train":
        argv = ["train", "--print-config", "--data", world.data, flag, value]
    else:
        argv = ["study", "--data", world.data, "--out", tmp_path / "study", flag, value]
    code, out, err = run_cli(argv, capfd)
    if config_accepts(name, value):
        assert code == 0, err
        assert yaml.safe_load(out)[name] == float(value)
    else:
        assert_refused(code, err, flag)
        assert list(tmp_path.iterdir()) == []
    assert_no_temporaries(tmp_path)


@pytest.mark.parametrize(
    ("command", "flag", "kind", "value", "accepted"), CLI_CASES, ids=[f"{c}{f}-{k}" for c, f, k, _, _ in CLI_CASES]
)
def test_cli_number(command, flag, kind, value, accepted, world, tmp_path, capfd, no_server):
    argv = {
        "predict-image": ["predict-image", world.photo, "--run", world.run],
        "predict": ["predict", "--run", world.run, "--images", world.photo, "--out", tmp_path / "p.csv"],
        "serve": ["serve", "--run", world.run, "--port", "0"],
        "eda": ["eda", "--data", world.data, "--out", tmp_path / "eda"],
        "export": ["export", "--run", world.run, "--int8", "--out", tmp_path / "int8.onnx"],
    }[command]
    code, out, err = run_cli([*argv, flag, value], capfd)
    if accepted:
        assert code == 0, err
    else:
        assert_refused(code, err, flag)
    assert_no_temporaries(tmp_path)


# --------------------------------------------------------------------------- run-folder files


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)  # not UTF-8, not JSON or YAML, not a zip or safetensors header


GENERIC = {
    "missing": lambda p: p.unlink(),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncate,
    "garbage": garbage,
}


def edit_json(change):
    def damage(path: Path) -> None:
        path.write_text(json.dumps(change(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")

    return damage


def edit_yaml(key: str, value):
    def damage(path: Path) -> None:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        config[key] = value
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    return damage


def edit_lines(change):
    def damage(path: Path) -> None:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        path.write_text("".join(json.dumps(r) + "\n" for r in change(records)), encoding="utf-8")

    return damage


def other_tensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(path))


def other_width(path: Path) -> None:
    """Class means and a precision one feature wider than the model's pooled features."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    means, precision = tensors["means"], tensors["precision"]
    width = means.shape[1] + 1
    save_file({"means": torch.zeros(len(means), width), "precision": torch.eye(width) + 0 * precision.sum()}, str(path))


def edit_checkpoint(change):
    def damage(path: Path) -> None:
        torch.save(change(torch.load(path, map_location="cpu", weights_only=True)), path)

    return damage


class RunsCode:
    """Unpickling this calls Path.touch(its argument): what a crafted checkpoint could do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def code_inside(path: Path) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["state"] = RunsCode(path.parent / "code-ran")
    torch.save(checkpoint, path)


def other_shapes(checkpoint: dict) -> dict:
    checkpoint["model"] = {key: torch.zeros(1) for key in checkpoint["model"]}
    return checkpoint


TAMPERED = {
    "config.yaml": {
        "epochs -3": edit_yaml("epochs", -3),
        "batch_size text": edit_yaml("batch_size", "many"),
        "unknown key": edit_yaml("bogus", 1),
        "a list": lambda p: p.write_text("- native\n- 64\n"),
    },
    "labels.json": {
        "one class": edit_json(lambda labels: labels[:1]),
        "a class twice": edit_json(lambda labels: [labels[0]] * len(labels)),
        "a plain string": edit_json(lambda labels: ",".join(labels)),
        "one class more": edit_json(lambda labels: [*labels, "Extra Bird"]),
    },
    "model_spec.json": {
        "input_size 5000": edit_json(lambda spec: {**spec, "input_size": 5000}),
        "resize bogus": edit_json(lambda spec: {**spec, "resize": "bogus"}),
        "std zero": edit_json(lambda spec: {**spec, "std": [0, 0, 0]}),
        "unknown model": edit_json(lambda spec: {**spec, "source": "timm:not_a_model"}),
        "a list": edit_json(lambda spec: [1, 2]),
    },
    "model.safetensors": {"other tensors": other_tensors},
    "split.json": {
        "val_ids a string": edit_json(lambda split: {**split, "val_ids": "TRAIN_00000"}),
        "val_ids numbers": edit_json(lambda split: {**split, "val_ids": [0, 1]}),
        "data folder gone": edit_json(lambda split: {**split, "data": "/nonexistent/lowres-birds-data"}),
        "other fingerprint": edit_json(lambda split: {**split, "fingerprint": "0" * 24}),
        "unknown val_ids": edit_json(lambda split: {**split, "val_ids": ["NOT_AN_ID"]}),
    },
    "checkpoint.pt": {
        "keys missing": edit_checkpoint(lambda checkpoint: {"model": checkpoint["model"]}),
        "code inside": code_inside,
        "other shapes": edit_checkpoint(other_shapes),
    },
    "calibration.json": {
        "temperature 0": edit_json(lambda calibration: {**calibration, "temperature": 0}),
        "score bogus": edit_json(lambda calibration: {**calibration, "score": "bogus"}),
        "threshold text": edit_json(lambda calibration: {**calibration, "threshold": "high"}),
        "keep_known above 1": edit_json(lambda calibration: {**calibration, "keep_known": 2}),
    },
    "unknown.safetensors": {"other tensors": other_tensors, "other width": other_width},
    "metrics.jsonl": {
        "epoch as text": edit_lines(lambda records: [{**r, "epoch": "one"} for r in records]),
        "no val_macro_f1": edit_lines(
            lambda records: [{k: v for k, v in r.items() if k != "val_macro_f1"} for r in records]
        ),
        "epoch twice": edit_lines(lambda records: records + records),
    },
}
MODEL_FILES = ("labels.json", "model_spec.json", "model.safetensors", "calibration.json", "unknown.safetensors")
READS = {  # what each command reads from a run folder; every other file may be damaged without effect
    "predict": MODEL_FILES,
    "predict-image": MODEL_FILES,
    "export": MODEL_FILES,
    "serve": MODEL_FILES,
    "report": ("config.yaml", *MODEL_FILES, "split.json", "metrics.jsonl"),
    "train --resume": ("config.yaml", "labels.json", "split.json", "checkpoint.pt", "metrics.jsonl"),
    "calibrate": (*MODEL_FILES[:3], "split.json", "config.yaml"),  # and writes calibration.json, unknown.safetensors
}
RUN_FILES = (
    "config.yaml",
    "labels.json",
    "model_spec.json",
    "split.json",
    "model.safetensors",
    "checkpoint.pt",
    "metrics.jsonl",
    "val_predictions.npz",
    "calibration.json",
    "unknown.safetensors",
)
# Damage a command cannot and need not see: report shows whatever split it is given (the ids must exist), and a run
# stopped in its first epoch has a checkpoint but no finished epoch in metrics.jsonl.
MODEL_READERS = ("predict", "predict-image", "export", "serve", "report")
# A run without calibration.json was calibrated before calibration existed: it loads uncalibrated.
NOT_AN_ERROR = {
    *((command, "calibration.json", "missing") for command in MODEL_READERS),
    ("report", "split.json", "other fingerprint"),
    ("calibrate", "split.json", "other fingerprint"),
    ("calibrate", "config.yaml", "missing"),  # a folder from before config.yaml was saved: it started from nothing
    ("train --resume", "metrics.jsonl", "missing"),
    ("train --resume", "metrics.jsonl", "empty"),
}
DAMAGES = {name: {**GENERIC, **TAMPERED.get(name, {})} for name in RUN_FILES}
UNREAD = "every unread file garbage"
RUN_FILE_CASES = [
    (command, name, damage) for command, names in READS.items() for name in names for damage in DAMAGES[name]
]
RUN_FILE_CASES += [(command, UNREAD, "garbage") for command in READS]


def run_command(command: str, world, run: Path, tmp: Path) -> list:
    return {
        "predict": ["predict", "--run", run, "--data", world.data, "--out", tmp / "s.csv"],
        "predict-image": ["predict-image", world.photo, "--run", run],
        "export": ["export", "--run", run, "--out", tmp / "m.onnx"],
        "serve": ["serve", "--run", run, "--port", "0"],
        "report": ["report", "--run", run],
        "train --resume": ["train", "--resume", run],
        "calibrate": ["calibrate", "--run", run],
    }[command]


@pytest.mark.parametrize(
    ("command", "name", "damage"), RUN_FILE_CASES, ids=[f"{c}-{n}-{d}".replace(" ", "_") for c, n, d in RUN_FILE_CASES]
)
def test_run_folder_file(command, name, damage, world, tmp_path, capfd, no_server):
    run = copy_run(world, tmp_path)
    if command == "train --resume":  # a finished run is refused by --resume: as if stopped before its epoch ended
        checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
        checkpoint["state"].update(epoch=0, step_in_epoch=0)
        torch.save(checkpoint, run / "checkpoint.pt")
    if name == UNREAD:
        for other in set(RUN_FILES) - set(READS[command]):
            garbage(run / other)
    else:
        DAMAGES[name][damage](run / name)
    code, _, err = run_cli(run_command(command, world, run, tmp_path), capfd)
    if name == UNREAD or (command, name, damage) in NOT_AN_ERROR:
        assert code == 0, err
    else:
        assert_refused(code, err, name)
        assert not (tmp_path / "s.csv").exists() and not (tmp_path / "m.onnx").exists()
    assert not (run / "code-ran").exists()
    assert_no_temporaries(tmp_path)


# --------------------------------------------------------------------------- full disk


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_replace_of(name: str):
    """os.replace that fails for ``name`` as on a full disk (the temporary file exists and must be removed)."""
    replace = os.replace

    def patched(source, target, *args, **kwargs):
        if Path(target).name == name:
            no_space()
        return replace(source, target, *args, **kwargs)

    return patched


def full_disk_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


class FullDiskFile(io.FileIO):
    """A file on a disk that fills up: the first 64 KB are written, then every write fails with ENOSPC."""

    room = 64 * 1024

    def write(self, data):
        if self.tell() + len(data) > self.room:
            no_space()
        return super().write(data)


def full_disk_for(name: str, after: int = 0):
    """open() for run_dir that gives the temporary file of ``name`` a full disk, after ``after`` good ones: the real
    torch.save then fails as it does on a full disk (an opaque RuntimeError around the OSError)."""
    opened = []

    def patched(file, mode="r", *args, **kwargs):
        if Path(file).name.startswith(f".{name}.") and "w" in mode:
            opened.append(file)
            if len(opened) > after:
                return FullDiskFile(file, "wb")
        return open(file, mode, *args, **kwargs)

    return patched


FULL_DISK = {  # case -> (owner, attribute patched, replacement, the file named in the error)
    "train-weights": ("safetensors.torch", "save_file", full_disk_safetensors, "model.safetensors"),
    "train-checkpoint": ("lowres_birds.run_dir", "open", full_disk_for("checkpoint.pt"), "checkpoint.pt"),
    "train-metrics": ("os", "replace", fail_replace_of("metrics.jsonl"), "metrics.jsonl"),
    "export-write": ("torch.onnx.ONNXProgram", "save", no_space, "m.onnx"),
    "export-rename": ("os", "replace", fail_replace_of("m.onnx"), "m.onnx"),
}


def owner(dotted: str):
    """A module, or a class inside one ("torch.onnx.ONNXProgram")."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("case", FULL_DISK)
def test_full_disk(case, world, tmp_path, capfd, monkeypatch):
    where, attribute, replacement, named = FULL_DISK[case]
    if case.startswith("train"):
        run, argv = (
            tmp_path / "run",
            ["train", "--data", world.data, "--out", tmp_path / "run", *FAST, "--strategy", "native"],
        )
    else:
        run, argv = world.run, ["export", "--run", world.run, "--out", tmp_path / "m.onnx"]
    with monkeypatch.context() as patch:
        patch.setattr(owner(where), attribute, replacement, raising=False)
        code, _, err = run_cli(argv, capfd)
    assert_refused_after_progress(code, err, named, "No space left on device")
    assert_no_temporaries(tmp_path, run)
    if case.startswith("export"):
        assert not (tmp_path / "m.onnx").exists()
        return
    # The disk has room again: the run resumes from its last checkpoint, or (none yet) is refused in one line and
    # can be started again with --force, which replaces it because this tool made it.
    code, _, err = run_cli(["train", "--resume", run], capfd)
    assert_refused(code, err, "has no checkpoint.pt to resume from")
    code, _, err = run_cli([*argv, "--force"], capfd)
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_full_disk_at_a_later_checkpoint_then_resume_records_each_epoch_once(world, tmp_path, capfd, monkeypatch):
    import lowres_birds.run_dir

    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        world.data,
        "--out",
        run,
        *FAST[:-4],
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--strategy",
        "native",
    ]
    with monkeypatch.context() as patch:
        # epoch 2's checkpoint
        patch.setattr(lowres_birds.run_dir, "open", full_disk_for("checkpoint.pt", after=1), raising=False)
        code, _, err = run_cli(argv, capfd)
    assert_refused_after_progress(code, err, "checkpoint.pt", "No space left on device")
    assert_no_temporaries(run)
    code, _, err = run_cli(["train", "--resume", run], capfd)
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# --------------------------------------------------------------------------- the stated size


def test_the_stated_corpus_size_is_true():
    outputs_accepted = sum(OUTPUTS[name].expected[kind] is OK for name, kind in OUTPUT_CASES)
    config_accepted = sum(config_accepts(name, value) for command, name, _, value in CONFIG_CASES if command == "train")
    numeric_accepted = config_accepted + sum(accepted for *_, accepted in CLI_CASES)
    files_accepted = sum(name == UNREAD or case in NOT_AN_ERROR for case in RUN_FILE_CASES for name in [case[1]])
    stated = {
        "output paths": (len(OUTPUT_CASES), len(OUTPUT_CASES) - outputs_accepted, outputs_accepted),
        "numeric flags": (NUMERIC_CASES, NUMERIC_CASES - numeric_accepted, numeric_accepted),
        "run-folder files": (len(RUN_FILE_CASES), len(RUN_FILE_CASES) - files_accepted, files_accepted),
    }
    for category, numbers in stated.items():
        found = re.search(rf"{category} +(\d+) cases, (\d+) refused / (\d+) accepted", __doc__)
        assert found and tuple(map(int, found.groups())) == numbers, (category, numbers)
    # + the later-checkpoint test
    assert re.search(r"full disk +(\d+) cases", __doc__).group(1) == str(len(FULL_DISK) + 1)
    assert f"the {len(NUMERIC_FIELDS)} numeric RunConfig fields" in __doc__
