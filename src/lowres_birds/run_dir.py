"""The run folder, and the one way this tool writes any file.

A run folder holds::

    config.yaml          the resolved RunConfig            labels.json      class names, output order
    model_spec.json      what rebuilds the model offline   hf_config/       Hugging Face config (hf: models)
    split.json           data folder, fingerprint, ids     model.safetensors  the kept weights
    metrics.jsonl        one record per validation         checkpoint.pt    resumable state (tensors + plain types)
    val_predictions.npz  the kept weights' validation probabilities (out-of-fold scoring)
    calibration.json     the temperature, the unknown score and its threshold   unknown.safetensors  its statistics
    report/              figures and report.html          hf/              the kept weights as a Hugging Face folder
    teacher/             the fine-tuned HR teacher: a run folder of its own, plus targets.safetensors (its logits
                         and pooled features on every training row's HR twin, the distillation targets)
    distill_targets.safetensors  a student's soft targets from the models of --distill-from
    degradation.json     the degradation fitted to the LR/HR pairs, with its held-out PSNR (a record, never read)
    study_result.json    written by ``study`` once the run finished (what ``study`` reuses)
    .lowres-birds        the marker of a folder this tool made (and --force may replace)

``train --folds K`` writes a folds folder (``FoldsDir``): ``fold0/`` ... ``fold<K-1>/`` (run folders) and ``oof.json``;
an ensemble recipe a members folder (``MembersDir``): ``<member>/`` (run or folds folders) and ``ensemble.json``.

``RunDir`` owns these names and their formats: every reader validates what it reads (a run folder is input
like any other) and names the file on failure; nothing is unpickled. Files are written by ``atomic_write``
(temporary file in the same folder, then rename; removed on failure; mode from the umask), whole run folders
copied by ``RunDir.copy_from`` (the same way, as a folder), and ``check_output`` is the only "exists and not
--force" check.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lowres_birds.config import (
    DATA_TABLES,
    ENSEMBLE_MODES,
    FIELDS,
    IMAGE_EXTENSIONS,
    KEYS_ADDED_LATER,
    STUDENT,
    TTA_MODES,
    RunConfig,
    config_from_mapping,
    parse_yaml_mapping,
)
from lowres_birds.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

MARKER = ".lowres-birds"  # written into every folder this tool creates and may later replace with --force
MIN_FREE_BYTES_FACTOR = 2  # a checkpoint write needs twice the last checkpoint's size free


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)`` then rename it to ``path``: readers never see half a file, a failure
    leaves neither a temporary file nor a changed ``path``. The file gets 0666 minus the umask, like open().
    ``write`` reports a failed write (full disk, unwritable folder) as OSError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; choose another output path") from None
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as exc:
        raise UserError(
            f"cannot write {path}: {exc.strerror or exc}; free some space or choose another output path"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)
    return path


class _WriteErrorKept:
    """The file object ``torch.save`` writes to. Torch turns an OSError from ``write`` (a full disk) into an opaque
    RuntimeError ("unexpected pos ..."); this keeps the OSError so that it can be raised instead."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.error = handle, None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_torch(path: Path, data: Any) -> Path:
    """``torch.save`` of tensors and plain types, atomically; a failed write is the OSError it was."""
    import torch

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            kept = _WriteErrorKept(handle)
            try:
                torch.save(data, kept)
            except RuntimeError:
                if kept.error is not None:
                    raise kept.error from None
                raise

    return atomic_write(path, write)


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=1))


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda temporary: frame.to_csv(temporary, index=False))


def check_output(
    path: Path, force: bool, *, folder: bool = False, others: Iterable[tuple[str, Path | None]] = ()
) -> None:
    """The one up-front check of an output path, before any work: refuse a path that is also an input or another
    output (``others``: (flag, path) pairs), a file where a folder is needed and the reverse, a parent that is a
    file, a parent that cannot be written (tried with a temporary file), and an existing output without --force."""
    path = Path(path)
    for flag, other in others:
        if other is not None and _same(path, Path(other)):
            raise UserError(f"{path} is also given as {flag}; choose another output path")
        if other is not None and _holds(Path(other), path) and _read_by_this_tool(path):
            raise UserError(f"{path} is one of the files of {flag} {other} this tool reads; choose another output path")
        if other is not None and folder and flag == "--data" and _holds(Path(other), path):
            raise UserError(
                f"{path} lies inside --data {other}, where its figures would be read as data (an ImageFolder's "
                "class folder takes every image); choose another output folder"
            )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    if path.exists():
        if folder and not path.is_dir():
            raise UserError(f"{path} is a file, not a folder; choose another output folder")
        if not folder and path.is_dir():
            raise UserError(f"{path} is a folder, not a file; choose another output file")
        if not force and not (folder and not any(path.iterdir())):
            raise UserError(f"{path} already exists; pass --force to overwrite it or choose another output path")
    _check_writable(path)


def check_folder_files(folder: Path, names: Iterable[str], page: str, force: bool) -> None:
    """A command that writes ``names`` into a folder that may hold other files: overwriting one of them is refused
    without --force, unless the folder is this command's own earlier output (it holds ``page``)."""
    if force or (Path(folder) / page).is_file():
        return
    taken = [name for name in names if (Path(folder) / name).exists()]
    if taken:
        raise UserError(
            f"{Path(folder) / taken[0]} already exists and {folder} holds no {page} of an earlier run of this command; "
            "pass --force to overwrite it or choose another --out"
        )


def _read_by_this_tool(path: Path) -> bool:
    """Whether ``path``, inside an input folder, is named as a file this tool reads there: a data table, an image,
    a file of a run, folds or ensemble folder."""
    run_files = {
        RunDir.CONFIG, RunDir.LABELS, RunDir.SPEC, RunDir.SPLIT, RunDir.WEIGHTS, RunDir.CHECKPOINT, RunDir.METRICS,
        RunDir.VAL_PREDICTIONS, RunDir.CALIBRATION, RunDir.UNKNOWN_STATISTICS, RunDir.TEACHER_TARGETS,
        RunDir.DISTILL_TARGETS, FoldsDir.SUMMARY, MembersDir.SUMMARY,
    }  # fmt: skip
    return path.name in DATA_TABLES or path.name in run_files or path.suffix.lower() in IMAGE_EXTENSIONS


def _holds(folder: Path, other: Path) -> bool:
    """Whether ``other`` lies inside ``folder`` (not ``folder`` itself: check_output names that case)."""
    try:
        return folder.resolve() in other.resolve().parents
    except (OSError, RuntimeError):
        return False


def _same(path: Path, other: Path) -> bool:
    try:
        return path.resolve() == other.resolve()
    except (OSError, RuntimeError):  # a symlink loop: not the same as anything we can tell
        return False


def _check_writable(path: Path) -> None:
    """Create and remove a temporary file in the nearest existing folder above ``path``: where ``path`` (a file,
    or a folder that --force may replace) will be created."""
    existing = next((p for p in path.absolute().parents if p.exists()), path.absolute())  # `/` has no parent
    try:
        handle, name = tempfile.mkstemp(dir=existing, prefix=".lowres-birds-probe.", suffix=".tmp")
    except OSError as exc:
        raise UserError(
            f"cannot write {path}: {existing} is not writable ({exc.strerror or exc}); choose another output path"
        ) from None
    os.close(handle)
    Path(name).unlink(missing_ok=True)


RUNS = Path("runs")  # where outputs go when --out is not given


def numbered_folder(kind: str, root: Path = RUNS) -> Path:
    """The default output folder of a command: runs/<kind>, then runs/<kind>2, runs/<kind>3, ... (the first that
    does not exist yet), so no earlier run is ever reused or replaced, as Ultralytics numbers runs/train."""
    candidate, number = Path(root) / kind, 1
    while candidate.exists():
        number += 1
        candidate = Path(root) / f"{kind}{number}"
    return candidate


def is_ours(folder: Path) -> bool:
    """A folder this tool made (marker), or a run folder written before the marker existed."""
    return (folder / MARKER).is_file() or ((folder / "config.yaml").is_file() and (folder / "labels.json").is_file())


def replace_folder(
    folder: Path,
    force: bool,
    create: bool = True,
    others: Iterable[tuple[str, Path | None]] = (),
    group: bool = False,
) -> None:
    """Make ``folder`` an empty folder of ours. An existing non-empty one is removed only with --force and only
    when this tool made it: never a data folder, a folder of runs or anything else a user keeps. With
    ``create=False`` only check (up front, and in the other processes of a multi-process run); ``others`` as in
    ``check_output``; a folder holding one of them is refused too (replacing it would delete that input), and so is
    an ensemble or folds folder unless ``group`` (what replaces it is one too)."""
    folder = Path(folder)
    for flag, other in others:
        if other is not None and _holds(folder, Path(other)):
            raise UserError(f"{folder} holds {flag} {other}, which replacing it would delete; choose another --out")
    held = [name for name in (MembersDir.SUMMARY, FoldsDir.SUMMARY) if (folder / name).is_file()]
    if held and not group:
        raise UserError(
            f"{folder} is an ensemble or folds folder ({held[0]}): --force replaces it only with another ensemble or "
            "folds run, never with one run or output; choose another --out"
        )
    if folder.is_dir() and any(folder.iterdir()) and not is_ours(folder):
        raise UserError(
            f"{folder} is not empty and not a lowres-birds output folder; it is never replaced, even with --force: "
            "choose another --out"
        )
    check_output(folder, force, folder=True, others=others)
    if not create:
        return
    try:
        if folder.is_dir() and any(folder.iterdir()):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text("made by lowres-birds; --force may replace this folder\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot create {folder}: {exc.strerror or exc}; choose another --out") from None


def check_labels(labels: Any, source: str, remedy: str) -> list[str]:
    """Class names as a model stores them (labels.json, ONNX metadata): at least 2, non-empty, each once."""
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x.strip() for x in labels):
        raise UserError(f"{source} must be a JSON list of at least 2 non-empty class names; {remedy}")
    if len(set(labels)) != len(labels):
        raise UserError(f"{source} lists a class twice; {remedy}")
    return labels


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_json(path: Path, missing: str, damaged: str) -> Any:
    """A JSON file this tool wrote; ``missing`` is the whole message for an absent file, ``damaged`` what to do
    when it does not parse."""
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {damaged}") from None


def _run_json(path: Path, what: str) -> Any:
    return load_json(path, f"{path} not found: {what}", "the run folder is damaged: retrain it")


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Tensors as a safetensors file, atomically; a failed write (a full disk) is an OSError like any other."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(temporary: Path) -> None:
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
        except SafetensorError as exc:  # how safetensors reports a failed write
            raise OSError(str(exc).removeprefix("Error while serializing: ")) from None

    return atomic_write(path, write)


def load_safetensors(path: Path, missing: str, damaged: str) -> dict:
    """A safetensors file's tensors (no code runs); ``missing`` is the whole message for an absent file,
    ``damaged`` what to do when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(missing)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]}); {damaged}"
        ) from None


class RunDir:
    """One run folder: its file names, and a validated reader and an atomic writer for each file."""

    CONFIG = "config.yaml"
    LABELS = "labels.json"
    SPEC = "model_spec.json"
    HF_CONFIG = "hf_config"
    SPLIT = "split.json"
    WEIGHTS = "model.safetensors"
    CHECKPOINT = "checkpoint.pt"
    METRICS = "metrics.jsonl"
    VAL_PREDICTIONS = "val_predictions.npz"
    DEGRADATION = "degradation.json"
    STUDY_RESULT = "study_result.json"
    REPORT = "report"
    TEACHER = "teacher"  # the fine-tuned HR teacher's run folder (teacher: finetuned)
    TEACHER_TARGETS = "targets.safetensors"  # in the teacher's folder
    DISTILL_TARGETS = "distill_targets.safetensors"  # a student's soft targets from the models of --distill-from
    # In every metrics.jsonl record; "epoch" counts the epochs trained (fractional for a validation within an epoch).
    # Records also hold "step" (the optimizer step; absent before validations within an epoch existed) and "lr".
    METRIC_KEYS = ("epoch", "train_loss", "train_images_per_s", "val_macro_f1", "val_accuracy", "elapsed_s")
    HF = "hf"  # the kept weights as a Hugging Face folder (export --format hf)
    CALIBRATION = "calibration.json"  # lowres-birds calibrate (and the end of train); absent in older runs
    UNKNOWN_STATISTICS = "unknown.safetensors"  # the feature statistics of the unknown score (feature scores only)

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def require(self) -> RunDir:
        if not self.path.is_dir():
            what = "a file" if self.path.exists() else "not found"
            raise UserError(
                f"{self.path} is not a finished run folder ({what}); pass a folder written by lowres-birds train "
                "(--run)"
            )
        return self

    # ---- config, labels, split
    def write_config(self, cfg: RunConfig) -> None:
        write_text(self / self.CONFIG, cfg.to_yaml())

    def config(self) -> RunConfig:
        path = self.require() / self.CONFIG
        if not path.is_file():
            raise UserError(f"{path} not found; {self.path} is not a run folder written by lowres-birds train")
        data = self._config_mapping()
        # a recipe may leave keys out, a run's config holds all but those added since it was written
        missing = [name for name in FIELDS if name not in data and name not in KEYS_ADDED_LATER]
        if missing:
            raise UserError(
                f"{path} lacks {len(missing)} of its {len(FIELDS)} keys (first: {missing[0]}); the run folder is "
                "damaged "
                "or older than this version: retrain it"
            )
        return config_from_mapping(data, str(path))

    def started_from(self) -> list[Path]:
        """The runs whose weights this one started from (config.yaml's ``init_from``). The config is checked, but a
        run older than some key still answers (the key takes its default); none for a folder without config.yaml."""
        path = self / self.CONFIG
        if not path.is_file():
            return []
        data = self._config_mapping()
        if not data:
            raise UserError(f"{path} is empty; the run folder is damaged")
        return [Path(run) for run in config_from_mapping(data, str(path)).init_runs]

    def _config_mapping(self) -> dict[str, Any]:
        path = self / self.CONFIG
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; the run folder is damaged") from None
        return parse_yaml_mapping(text, str(path))

    def write_labels(self, labels: list[str]) -> None:
        write_json(self / self.LABELS, list(labels))

    def labels(self) -> list[str]:
        path = self.require() / self.LABELS
        return check_labels(
            _run_json(path, f"{self.path} is not a finished run folder"), str(path), "the run folder is damaged"
        )

    def write_split(self, data_dir: Path, val_ids: list[str], fingerprint: str) -> None:
        write_json(
            self / self.SPLIT, {"data": str(Path(data_dir).resolve()), "fingerprint": fingerprint, "val_ids": val_ids}
        )

    def split(self) -> dict:
        path = self.require() / self.SPLIT
        split = _run_json(
            path, f"{self.path} does not record its data; pass a run folder written by lowres-birds train"
        )
        if (
            not isinstance(split, dict)
            or not isinstance(split.get("data"), str)
            or not isinstance(split.get("val_ids"), list)
            or not all(isinstance(image_id, str) for image_id in split["val_ids"])
        ):
            raise UserError(
                f"{path} must hold 'data' (a folder) and 'val_ids' (a list of image ids); the run folder is damaged"
            )
        return split

    def data_dir(self, override: Path | None = None) -> Path:
        """The data folder the run was trained on, unless --data names another."""
        if override is not None:
            return Path(override)
        data = Path(self.split()["data"])
        if not data.is_dir():
            raise UserError(
                f"{self / self.SPLIT} names the data folder {data}, which is not found; pass the run's data folder "
                "with --data"
            )
        return data

    # ---- model
    def write_spec(self, spec: dict) -> None:
        write_json(self / self.SPEC, spec)

    def spec(self) -> dict:
        spec = _run_json(self.require() / self.SPEC, f"{self.path} is not a finished run folder")
        if not isinstance(spec, dict):
            raise UserError(f"{self / self.SPEC} must be a JSON object; the run folder is damaged")
        return spec

    def save_weights(self, state_dict: dict) -> None:
        save_safetensors(self / self.WEIGHTS, state_dict)

    def weights(self) -> dict:
        return load_safetensors(
            self.require() / self.WEIGHTS,
            missing=f"{self.path} is not a finished run (no {self.WEIGHTS}); train it first or pass the right --run",
            damaged="the run folder is damaged",
        )

    # ---- training state
    def append_metrics(self, record: dict) -> None:
        """Add one validation's record; records from that point on (a resume after a failed checkpoint) are replaced."""
        records = [r for r in self.metrics(missing_ok=True) if r["epoch"] < record["epoch"]] + [record]
        write_text(self / self.METRICS, "".join(json.dumps(r) + "\n" for r in records))

    def metrics(self, missing_ok: bool = False) -> list[dict]:
        path = self / self.METRICS
        if not path.is_file() or path.stat().st_size == 0:
            if missing_ok:
                return []
            raise UserError(f"{self.path} has no {self.METRICS} with a validation; pass a training run folder (--run)")
        try:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is not JSON lines ({exc}); the run folder is damaged") from None
        for number, record in enumerate(records, start=1):
            if (
                not isinstance(record, dict)
                or not all(_is_number(record.get(key)) for key in self.METRIC_KEYS)
                or record["epoch"] <= 0
            ):
                raise UserError(
                    f"{path} line {number}: not a validation record ({', '.join(self.METRIC_KEYS)}); the run folder is "
                    "damaged"
                )
            if "step" in record and not (
                isinstance(record["step"], int) and not isinstance(record["step"], bool) and record["step"] > 0
            ):
                raise UserError(
                    f"{path} line {number}: step must be a positive whole number (got {record['step']!r}); the run "
                    "folder is damaged"
                )
            if number > 1 and record["epoch"] <= records[number - 2]["epoch"]:
                raise UserError(
                    f"{path} line {number}: epoch {record['epoch']} does not follow epoch "
                    f"{records[number - 2]['epoch']}; the run folder is damaged"
                )
        return records

    def kept_record(self) -> dict:
        """The metrics record of the validation whose weights the run kept (config ``keep``): its best one (the first
        of equals, as training keeps it), or its last one."""
        records = self.metrics()
        if self.config().keep == "last":
            return records[-1]
        return max(records, key=lambda record: record["val_macro_f1"])

    def kept_val_macro_f1(self) -> float:
        """The validation macro-F1 of the weights the run kept (a fold run's is its out-of-fold score)."""
        return self.kept_record()["val_macro_f1"]

    def save_checkpoint(self, checkpoint: dict) -> None:
        """torch.save of tensors and plain types, refused up front when the disk is clearly too full."""
        path = self / self.CHECKPOINT
        previous = path.stat().st_size if path.exists() else 0
        free = shutil.disk_usage(self.path).free
        if previous and free < MIN_FREE_BYTES_FACTOR * previous:
            raise UserError(
                f"only {free / 1e6:.0f} MB free in {self.path}, a checkpoint needs about {previous / 1e6:.0f} MB; "
                "free some space and resume (the previous checkpoint is intact)"
            )
        save_torch(path, checkpoint)

    def checkpoint(self) -> dict:
        """The checkpoint, loaded with ``weights_only=True``: a crafted file cannot run code."""
        import pickle

        import torch

        path = self.require() / self.CHECKPOINT
        if not path.is_file():
            raise UserError(f"{self.path} has no {self.CHECKPOINT} to resume from; start a new run without --resume")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
            raise UserError(
                f"{path} is not a readable checkpoint ({type(exc).__name__}); it is damaged: start a new run"
            ) from None
        needed = ("model", "optimizer", "scheduler", "state", "rng")
        if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in needed):
            raise UserError(f"{path} lacks {', '.join(needed)}; it is not a lowres-birds checkpoint: start a new run")
        return checkpoint

    # ---- the fine-tuned teacher's distillation targets (in RUN/teacher)
    def write_hf_config(self, savers: list[Callable[[Path], None]]) -> None:
        """hf_config/ as the ``savers`` (transformers' ``save_pretrained`` of a config, a processor) write it into a
        folder: complete or absent, as every file of the run."""
        import shutil

        temporary = self.path / f".{self.HF_CONFIG}.writing"
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            for save in savers:
                save(temporary)
            shutil.rmtree(self / self.HF_CONFIG, ignore_errors=True)
            temporary.replace(self / self.HF_CONFIG)
        except OSError as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            raise UserError(
                f"cannot write {self / self.HF_CONFIG}: {exc.strerror or exc}; free some disk space"
            ) from None

    def has_checkpoint(self) -> bool:
        return (self / self.CHECKPOINT).is_file()

    def resumable(self) -> bool:
        """Whether ``train --resume`` can continue this run: a checkpoint of its own, or of its fine-tuned teacher
        (which trains first: stopped there, or right after, the student has no record yet)."""
        teacher = RunDir(self / self.TEACHER)
        return self.has_checkpoint() or (teacher.has_checkpoint() and not self.metrics(missing_ok=True))

    def mark_study_finished(self, result: dict) -> None:
        write_json(self / self.STUDY_RESULT, result)

    def study_finished(self) -> bool:
        """Whether ``study`` saw this run finish (the file's content, train's result, is a record: never read)."""
        return (self / self.STUDY_RESULT).is_file()

    def copy_from(self, other: Path) -> None:
        """This folder as a copy of the run folder ``other`` (a teacher shared by ensemble members), complete or
        absent."""
        import shutil

        temporary = self.path.with_name(f".{self.path.name}.copying")
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            shutil.copytree(other, temporary)
            temporary.replace(self.path)
        except OSError as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            raise UserError(
                f"cannot copy {other} to {self.path}: {exc.strerror or exc}; free some disk space and resume"
            ) from None

    def save_teacher_targets(
        self,
        features: torch.Tensor | None,
        logits: torch.Tensor,
        val_macro_f1: float,
        seconds: float,
        name: str = TEACHER_TARGETS,
    ) -> None:
        """A teacher's targets (``name``: TEACHER_TARGETS, or DISTILL_TARGETS with ``features`` None)."""
        import torch

        save_safetensors(
            self / name,
            {
                "features": torch.zeros(len(logits), 0) if features is None else features,
                "logits": logits,
                "val_macro_f1": torch.tensor(val_macro_f1),
                "seconds": torch.tensor(seconds),
            },
        )

    def teacher_targets(
        self, rows: int, classes: int, damaged: str, name: str = TEACHER_TARGETS, with_features: bool = True
    ) -> dict:
        """features (rows x D; ``with_features`` False: none, returned as None), logits (rows x classes), val_macro_f1
        and seconds, all finite; ``damaged``: what happens to a file that is not that."""
        path = self / name
        tensors = load_safetensors(path, missing=f"{path} not found; {damaged}", damaged=damaged)
        keys = ("features", "logits", "val_macro_f1", "seconds")
        if any(key not in tensors for key in keys):
            raise UserError(f"{path} lacks one of {', '.join(keys)}; {damaged}")
        features, logits = tensors["features"], tensors["logits"]
        shapes = f"{tuple(features.shape)} features and {tuple(logits.shape)} logits"
        scalars = tensors["val_macro_f1"].numel() == 1 and tensors["seconds"].numel() == 1
        if (
            features.ndim != 2
            or len(features) != rows
            or (features.shape[1] < 1) == with_features
            or tuple(logits.shape) != (rows, classes)
            or not scalars
        ):
            raise UserError(
                f"{path} holds {shapes}, not {rows} x D features, {rows} x {classes} logits and two scalars; {damaged}"
            )
        if (
            not all(bool(tensor.float().isfinite().all()) for tensor in tensors.values())
            or not 0 <= float(tensors["val_macro_f1"]) <= 1
        ):
            raise UserError(f"{path} holds values that are not finite (or a macro-F1 outside 0-1); {damaged}")
        return {
            "features": features.float() if with_features else None,
            "logits": logits.float(),
            "val_macro_f1": float(tensors["val_macro_f1"]),
            "seconds": float(tensors["seconds"]),
        }

    def save_val_predictions(self, indices: np.ndarray, targets: np.ndarray, probs: np.ndarray) -> None:
        import numpy as np

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, indices=indices, targets=targets, probs=probs)

        atomic_write(self / self.VAL_PREDICTIONS, write)

    def val_predictions(self) -> dict:
        import numpy as np

        path = self.require() / self.VAL_PREDICTIONS
        try:
            with np.load(path, allow_pickle=False) as data:
                predictions = {key: data[key] for key in ("indices", "targets", "probs")}
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path} is missing or damaged ({type(exc).__name__}); retrain that run") from None
        if (
            predictions["probs"].ndim != 2
            or len(predictions["probs"]) != len(predictions["targets"])
            or not math.isfinite(float(predictions["probs"].sum()))
        ):
            raise UserError(f"{path} holds inconsistent arrays; retrain that run")
        return predictions

    # ---- calibration (the temperature and the unknown score)
    def write_calibration(self, calibration: dict, statistics: dict) -> None:
        """calibration.json, and the unknown score's statistics (class means, training features) when it has any."""
        (self / self.UNKNOWN_STATISTICS).unlink(missing_ok=True)
        if statistics:
            save_safetensors(self / self.UNKNOWN_STATISTICS, statistics)
        write_json(self / self.CALIBRATION, calibration)

    def calibration(
        self,
        scores: tuple[str, ...],
        statistics: dict[str, tuple[str, ...]],
        classes: int | None = None,
        width: int | None = None,
    ) -> tuple[dict, dict] | None:
        """(calibration.json, the score's statistics) checked, or None for a run calibrated before this existed.
        ``scores``: the unknown scores there are; ``statistics``: the tensors each score needs; ``classes`` and
        ``width`` (the model's, when known): the shapes they must have (class means ``classes`` x ``width``, the
        precision ``width`` x ``width``, training features N x ``width``)."""
        path = self.require() / self.CALIBRATION
        if not path.is_file():
            return None
        damaged = f"the calibration is damaged: run lowres-birds calibrate --run {self.path}"
        calibration = load_json(path, "", damaged)
        if (
            not isinstance(calibration, dict)
            or not _is_number(calibration.get("temperature"))
            or not calibration["temperature"] > 0
            or calibration.get("score") not in scores
            or not _is_number(calibration.get("threshold"))
            or calibration.get("tta", "none") not in TTA_MODES
            or not _is_number(calibration.get("temperature_folded", 1))
            or not calibration.get("temperature_folded", 1) > 0
            or not _is_number(calibration.get("keep_known", 1))
            or not 0 < calibration.get("keep_known", 1) <= 1
            or not isinstance(calibration.get("unfitted", False), bool)
        ):
            raise UserError(
                f"{path} must give 'temperature' (a positive number), 'score' (one of {', '.join(scores)}) and "
                f"'threshold' (a number), and if any 'temperature_folded' (a positive number), 'keep_known' (a share "
                f"above 0, at most 1), 'tta' (one of {', '.join(TTA_MODES)}) and 'unfitted' (true or false); {damaged}"
            )
        needed = statistics.get(calibration["score"], ())
        if not needed:
            return calibration, {}
        tensors = load_safetensors(
            self / self.UNKNOWN_STATISTICS, f"{self / self.UNKNOWN_STATISTICS} not found; {damaged}", damaged
        )
        if any(name not in tensors or tensors[name].ndim != 2 for name in needed) or not all(
            bool(tensors[name].float().isfinite().all()) for name in needed
        ):
            raise UserError(
                f"{self / self.UNKNOWN_STATISTICS} lacks finite 2-D {', '.join(needed)} for the score "
                f"{calibration['score']}; {damaged}"
            )
        expected = {"means": (classes, width), "precision": (width, width), "bank": (None, width)}
        for name in needed:
            shape = tuple(tensors[name].shape)
            if any(want is not None and got != want for got, want in zip(shape, expected[name])):
                raise UserError(
                    f"{self / self.UNKNOWN_STATISTICS} holds {name} of shape {shape}, not "
                    f"{tuple('N' if w is None else w for w in expected[name])} for this model; {damaged}"
                )
        return calibration, {name: tensors[name] for name in needed}


class RunGroup:
    """A folder of run folders described by one JSON summary file (``SUMMARY``, which a run folder never holds)."""

    SUMMARY: str

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def is_group(self) -> bool:
        return (self.path / self.SUMMARY).is_file()

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / self.SUMMARY, summary)


class FoldsDir(RunGroup):
    """The folder ``train --folds K`` writes: one run folder per fold (``fold<k>/``) and the out-of-fold summary."""

    SUMMARY = "oof.json"

    def fold(self, k: int) -> Path:
        return self.path / f"fold{k}"

    def summary(self) -> dict:
        path = self.path / self.SUMMARY
        summary = load_json(
            path,
            f"{path} not found; {self.path} is not a folder written by lowres-birds train --folds",
            "retrain the folds",
        )
        folds = summary.get("folds") if isinstance(summary, dict) else None
        if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
            raise UserError(
                f"{path} must give 'folds', a whole number of at least 2; the folds folder is damaged: retrain the "
                "folds"
            )
        return summary

    def runs(self) -> list[Path]:
        """The fold run folders, in fold order; every fold the summary counts must be there."""
        folds = self.summary()["folds"]
        missing = [self.fold(k) for k in range(folds) if not self.fold(k).is_dir()]
        if missing:
            raise UserError(
                f"{self.path / self.SUMMARY} counts {folds} folds but {missing[0]} is missing; retrain the folds or "
                "pass the fold runs with --run"
            )
        return [self.fold(k) for k in range(folds)]


class MembersDir(RunGroup):
    """The folder an ensemble recipe (``members:``) trains: one run (or folds) folder per member, the distilled
    ``student/`` run when the recipe has one, and ``ensemble.json``, which records each member's config, the data
    folder, how the ensemble predicts (``ensemble`` weights, ``tta``) and each finished member's validation
    macro-F1, so ``train --resume OUT`` trains only what is missing and ``predict --run OUT`` finds the members."""

    SUMMARY = "ensemble.json"

    def member(self, name: str) -> Path:
        return self.path / name

    @property
    def student(self) -> Path:
        return self.path / STUDENT

    def summary(self) -> dict:
        """{"data": str, "members": {name: config dict}, "val_macro_f1": {name: float}, "ensemble": mean|f1, "tta":
        none|flip, and with a student "student": config dict, "student_val_macro_f1" once it finished}, checked
        (a folder written before the last four keys existed reads as mean, none, no student)."""
        path = self.path / self.SUMMARY
        damaged = "the ensemble folder is damaged: retrain it"
        summary = load_json(
            path, f"{path} not found; {self.path} is not a folder written by an ensemble recipe", damaged
        )
        members = summary.get("members") if isinstance(summary, dict) else None
        scores = summary.get("val_macro_f1") if isinstance(summary, dict) else None
        if (
            not isinstance(members, dict)
            or not members
            or not all(isinstance(c, dict) for c in members.values())
            or not isinstance(summary.get("data"), str)
            or not isinstance(scores, dict)
            or not set(scores) <= set(members)
            or not all(_is_number(v) for v in scores.values())
        ):
            raise UserError(
                f"{path} must give 'data', 'members' (name -> config) and 'val_macro_f1' (name -> number); {damaged}"
            )
        summary = {"ensemble": "mean", "tta": "none", **summary}
        if (
            summary["ensemble"] not in ENSEMBLE_MODES
            or summary["tta"] not in TTA_MODES
            or not isinstance(summary.get("student", {}), dict)
            or not _is_number(summary.get("student_val_macro_f1", 0))
        ):
            raise UserError(
                f"{path}: 'ensemble' must be one of {', '.join(ENSEMBLE_MODES)}, 'tta' one of {', '.join(TTA_MODES)}, "
                f"'student' a config and 'student_val_macro_f1' a number; {damaged}"
            )
        return summary

    def runs(self) -> list[Path]:
        """The member folders, in recipe order; every member must have finished training (the student is not one)."""
        summary = self.summary()
        missing = [
            name for name in summary["members"] if name not in summary["val_macro_f1"] or not self.member(name).is_dir()
        ]
        if missing:
            raise UserError(
                f"member {missing[0]} of the ensemble {self.path} has not finished training; continue with: "
                f"lowres-birds train --resume {self.path}"
            )
        return [self.member(name) for name in summary["members"]]


def recorded_prediction(sources: list[Path]) -> dict[str, str]:
    """How a single ensemble recipe's folder predicts ({"ensemble": mean|f1, "tta": none|flip}, from its
    ensemble.json); anything else (a run, a folds folder, several sources): mean, none."""
    if len(sources) == 1 and MembersDir(sources[0]).is_group():
        summary = MembersDir(sources[0]).summary()
        return {"ensemble": summary["ensemble"], "tta": summary["tta"]}
    return {"ensemble": "mean", "tta": "none"}


def model_folders(source: Path | str) -> list[Path]:
    """The run folders a model path stands for: an ensemble folder its members', a folds folder its folds',
    anything else (a run, an ONNX file, a Hugging Face folder) itself."""
    if MembersDir(source).is_group():
        return [run for member in MembersDir(source).runs() for run in model_folders(member)]
    if FoldsDir(source).is_group():
        return FoldsDir(source).runs()
    return [Path(source)]
