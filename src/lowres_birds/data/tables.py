"""Data tables: read the competition layout (or an ImageFolder) and check it before anything trains.

Every problem a user can fix raises ``UserError`` naming the file (and row) and what to do.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lowres_birds.config import DATA_TABLES, IMAGE_EXTENSIONS
from lowres_birds.errors import UserError

COMPETITION_FILES = (*DATA_TABLES, "upscale_train")  # any of them: not an ImageFolder


@dataclass
class ImageTable:
    """One split: ids, low-res paths, optional high-res twins, optional labels (None for test)."""

    root: Path
    ids: list[str]
    lr_paths: list[Path]
    hr_paths: list[Path] | None = None
    labels: list[str] | None = None
    hr_missing: str = ""  # why hr_paths is None, for the error of a run that needs the twins

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """What a run was trained on (ids, labels, file names), compared on --resume."""
        digest = hashlib.sha256()
        for image_id, path, label in zip(self.ids, self.lr_paths, self.labels or [""] * len(self.ids)):
            digest.update(f"{image_id}|{path.name}|{label}\n".encode())
        return digest.hexdigest()[:24]


# --------------------------------------------------------------------------- CSV reading


def read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV as strings, tolerant of BOM, CRLF and ';' separators; missing columns name themselves."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a CSV file; pass the CSV file")
    if not path.is_file():
        raise UserError(f"{path} not found: expected the competition layout (train.csv, test.csv, train/, test/)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = handle.readline()
        sep = ";" if header.count(";") > header.count(",") else ","
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save it as UTF-8 CSV") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path} could not be read as CSV: {str(exc).strip().splitlines()[0]}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(frame.columns)})")
    if frame.empty:
        raise UserError(f"{path} has a header but no rows")
    for column in required:
        frame[column] = frame[column].str.strip()
    return frame


def check_ids(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``frame`` (read from ``path``) when every row has an id and no id repeats; else one line naming the row."""
    empty = frame.index[frame["id"] == ""]
    if len(empty):
        raise UserError(f"{path} row {empty[0] + 2}: empty id; every row needs an id")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        row = int(duplicated.index[0]) + 2
        raise UserError(
            f"{path} row {row}: duplicate id {duplicated.iloc[0]!r} ({len(duplicated)} duplicates); ids must be unique"
        )
    return frame


def _image_paths(root: Path, values: list[str], csv_path: Path, column: str) -> list[Path]:
    """One CSV column of image paths, relative to the CSV's folder (with or without './'): an empty cell or a path
    escaping the folder is refused naming its row, and every file must exist (one listing per folder rather
    than one stat per file, string arithmetic rather than pathlib's: 100,000 rows take a fraction of a second)."""
    base, resolved = str(root), []
    for row, relative in enumerate(values, start=2):
        if relative == "":
            raise UserError(f"{csv_path} row {row}: empty image path")
        normalised = os.path.normpath(relative)
        if os.path.isabs(normalised) or normalised == ".." or normalised.startswith(".." + os.sep):
            raise UserError(f"{csv_path} row {row}: image path {relative!r} points outside the data folder; refused")
        resolved.append(os.path.join(base, normalised))
    listings: dict[str, set[str]] = {}
    missing = []
    for path in resolved:
        folder, name = os.path.split(path)
        names = listings.get(folder)
        if names is None:
            names = listings[folder] = _regular_files(folder)
        if name not in names:
            missing.append(path)
    if missing:
        raise UserError(
            f"{csv_path}: {len(missing)} file(s) in column {column} missing or not regular files (first: "
            f"{', '.join(missing[:3])}); "
            "check the data folder is complete"
        )
    return _as_paths(resolved)


def _as_paths(strings: list[str]) -> list[Path]:
    """Path objects for many strings, with the cyclic garbage collector paused meanwhile: 100,000 new objects
    trigger collections that each walk every object of a process that has imported torch (measured: a
    100,000-row test table in 1.2-1.3 s with it running, under 1 s without; benchmarks/scale.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return [Path(string) for string in strings]
    finally:
        if enabled:
            gc.enable()


def _regular_files(folder: str) -> set[str]:
    """Names of the regular files (or links to one) in ``folder``; empty when it is missing or unreadable."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except OSError:
        return set()


def _check_labels(labels: list[str], source: str) -> None:
    for row, label in enumerate(labels, start=2):
        if label == "":
            raise UserError(f"{source} row {row}: empty label; give every training image a label")
    counts = pd.Series(labels).value_counts()
    if len(counts) < 2:
        raise UserError(f"{source}: every image is labelled {counts.index[0]!r}; a classifier needs at least 2 classes")
    rare = counts[counts < 2]
    if len(rare):
        raise UserError(
            f"{source}: class {rare.index[0]!r} has only {int(rare.iloc[0])} image ({len(rare)} such classes); "
            "every class needs at least 2 images for a stratified validation split"
        )


# --------------------------------------------------------------------------- layouts


def load_train_table(data_dir: Path, check_labels: bool = True) -> ImageTable:
    """The training split of a competition folder (train.csv) or of an ImageFolder (DIR/<class>/*.jpg);
    ``check_labels``: refuse empty labels and classes of one image, which training cannot split (eda reports them
    instead)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} {'is a file, not a folder' if data_dir.exists() else 'not found'}")
    csv_path = data_dir / "train.csv"
    if is_image_folder(data_dir):
        table = load_image_folder(data_dir)
        if check_labels:
            _check_labels(table.labels, str(data_dir))
        return table
    frame = read_csv(csv_path, ("id", "img_path", "label"))
    check_ids(frame, csv_path)
    lr_paths = _image_paths(data_dir, frame["img_path"].tolist(), csv_path, "img_path")
    hr_paths, hr_missing = None, f"{csv_path} has no upscale_img_path column"
    if "upscale_img_path" in frame.columns:
        column = frame["upscale_img_path"].str.strip()
        empty = frame.index[column == ""]
        if len(empty):  # the twins are optional: refused only by a run that needs them
            hr_missing = (
                f"{csv_path} row {empty[0] + 2}: empty upscale_img_path ({len(empty)} of {len(frame)} rows); give "
                "every row its twin"
            )
        else:
            hr_paths = _image_paths(data_dir, column.tolist(), csv_path, "upscale_img_path")
    labels = frame["label"].tolist()
    if check_labels:
        _check_labels(labels, str(csv_path))
    return ImageTable(data_dir, frame["id"].tolist(), lr_paths, hr_paths, labels, hr_missing)


def _class_folders(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_image_folder(data_dir: Path) -> bool:
    """A folder of class sub-folders (DIR/<class>/*.jpg) with no competition files."""
    data_dir = Path(data_dir)
    competition_files = [n for n in COMPETITION_FILES if (data_dir / n).exists()]
    return data_dir.is_dir() and not competition_files and bool(_class_folders(data_dir))


def load_image_folder(data_dir: Path) -> ImageTable:
    """A labelled ImageFolder (DIR/<class>/*.jpg): ids are ``<class>/<file>``, labels the folder names.
    Training adds its own checks (two images per class); scoring takes any labelled folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} {'is a file, not a folder' if data_dir.exists() else 'not found'}")
    ids, paths, labels = [], [], []
    for folder in _class_folders(data_dir):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                ids.append(f"{folder.name}/{path.name}")
                paths.append(path)
                labels.append(folder.name)
    if not paths:
        raise UserError(f"{data_dir}: no train.csv and no images in class sub-folders (DIR/<class>/*.jpg)")
    return ImageTable(
        data_dir, ids, paths, None, labels, f"{data_dir} is an ImageFolder, which has no upscale_img_path column"
    )


def images_root(where: str | Path) -> Path:
    """Where ``find_images(where)`` reads: the file or folder given, or a glob's folder before its first wildcard."""
    import glob

    parts = Path(where).parts
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
    return Path(*fixed) if fixed else Path(".")


def find_images(where: str | Path) -> list[Path]:
    """The image files (by extension) of a folder, searched recursively, or of a glob pattern ('photos/*.jpg',
    'photos/**/*.png'), or one file; sorted. Hidden files and folders are skipped; none found is a UserError."""
    import glob

    text = str(where)
    if not text.strip():
        raise UserError("no images given (an empty path): pass an image, a folder of images or a quoted glob pattern")
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [
            p
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        where_text = f"folder {path}"
    elif glob.has_magic(text):
        found = [
            Path(p)
            for p in glob.glob(text, recursive=True)
            if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file()
        ]
        where_text = f"pattern {text!r}"
    else:
        raise UserError(
            f"{text} not found: pass an image, a folder of images or a quoted glob pattern such as 'photos/*.jpg'"
        )
    if not found:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {where_text}")
    return sorted(found)


def load_test_table(data_dir: Path) -> ImageTable:
    """test.csv in sample_submission.csv's order when that file exists (else test.csv's own order)."""
    data_dir = Path(data_dir)
    csv_path = data_dir / "test.csv"
    frame = read_csv(csv_path, ("id", "img_path"))
    check_ids(frame, csv_path)
    order = frame["id"].tolist()
    paths = dict(zip(order, _image_paths(data_dir, frame["img_path"].tolist(), csv_path, "img_path")))
    sample_path = data_dir / "sample_submission.csv"
    if sample_path.exists():
        sample = read_csv(sample_path, ("id",))
        check_ids(sample, sample_path)
        sample_order = sample["id"].tolist()
        sample_ids = set(sample_order)
        absent = [i for i in order if i not in sample_ids]
        if absent:
            raise UserError(
                f"{csv_path}: {len(absent)} id(s) absent from {sample_path.name} (first: {absent[0]}); "
                "the two files must list the same ids"
            )
        unknown = [i for i in sample_order if i not in paths]
        if unknown:
            raise UserError(f"{sample_path}: {len(unknown)} id(s) not in test.csv (first: {unknown[0]})")
        order = sample_order
    return ImageTable(data_dir, order, [paths[i] for i in order])


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    """Class names sorted alphabetically, as sklearn's LabelEncoder does."""

    classes: tuple[str, ...]

    @classmethod
    def fit(cls, labels: list[str]) -> LabelMap:
        return cls(tuple(sorted(set(labels))))

    def encode(self, labels: list[str]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[label] for label in labels], dtype=np.int64)

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self.classes[int(i)] for i in indices]
