"""Look before training: class balance, image sizes/modes/formats, per-channel normalisation values,
LR/HR samples, and data-quality checks (exact duplicates, train/test leakage, mismatched LR/HR twins).

Pixel statistics reuse the decoded-image cache that training fills (``data.load_images``), so a second
``eda`` or a later ``train`` decodes nothing; sizes, modes and formats come from the file headers,
which is what a user has to fix when they differ.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowres_birds.config import HR_SIZE, LR_SIZE
from lowres_birds.data.images import fit_square, load_images
from lowres_birds.data.tables import load_test_table, load_train_table
from lowres_birds.errors import UserError
from lowres_birds.extras import require as require_extra
from lowres_birds.inspect.html import Section, write_page
from lowres_birds.inspect.plots import barh_png, image_grid_png
from lowres_birds.progress import bar as progress_bar
from lowres_birds.run_dir import write_csv

if TYPE_CHECKING:
    import pandas as pd

    from lowres_birds.data.tables import ImageTable

SAMPLE_CLASSES = 6
EXAMPLES = 8  # rows shown per quality problem


@dataclass
class Folder:
    """One image folder of the data set and the square size its pixels are cached at."""

    name: str
    paths: list[Path]
    size: int


# --------------------------------------------------------------------------- classes


# Every file write_eda puts in its folder: what an eda may not overwrite without --force.
EDA_FILES = (
    "class_counts.csv", "class_counts.png", "duplicates_train.csv", "image_stats.csv", "leakage_examples.png",
    "leakage_train_test.csv", "samples.png", "twin_lowest_psnr.png", "twin_psnr.csv", "eda.html",
)  # fmt: skip


def class_counts(labels: list[str]) -> pd.DataFrame:
    """label, count: most frequent first (ties alphabetical), as the reference's value_counts()."""
    import pandas as pd

    counts = pd.Series(labels).value_counts().rename_axis("label").reset_index(name="count")
    return counts.sort_values(["count", "label"], ascending=[False, True], kind="stable", ignore_index=True)


# --------------------------------------------------------------------------- image statistics


def _header(path: Path) -> tuple[str, str, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # reads the header only
            return f"{image.width}x{image.height}", image.mode, image.format or "?"
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: not a readable image ({exc}); replace or remove it") from None


def channel_stats(images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] over N x S x S x 3 uint8 images, exact, from per-channel
    histograms (integer counting is ~8x faster than float sums over the 800 MB of HR pixels)."""
    counts = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk])
        for channel in range(3):
            counts[channel] += np.bincount(block[..., channel].ravel(), minlength=256)
    values = np.arange(256) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ values / total
    return mean, np.sqrt(np.maximum(counts @ values**2 / total - mean**2, 0))


def _top(series: pd.Series) -> str:
    counts = series.value_counts()
    shown = ", ".join(f"{value} ({count})" for value, count in counts.head(4).items())
    return shown + (f", {len(counts) - 4} more" if len(counts) > 4 else "")


def image_stats(folders: list[Folder], pixels: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per folder: file count, sizes, modes, formats (headers), mean/std per channel (pixels)."""
    import pandas as pd

    rows = []
    for folder in folders:
        with ThreadPoolExecutor(max_workers=4) as pool:
            read = progress_bar(
                pool.map(_header, folder.paths), desc=f"reading {folder.name} headers", total=len(folder.paths)
            )
            headers = pd.DataFrame(list(read), columns=["size", "mode", "format"])
        mean, std = channel_stats(pixels[folder.name])
        rows.append(
            {
                "folder": folder.name,
                "images": len(folder.paths),
                "sizes": _top(headers["size"]),
                "modes": _top(headers["mode"]),
                "formats": _top(headers["format"]),
                "mean (R, G, B)": ", ".join(f"{v:.4f}" for v in mean),
                "std (R, G, B)": ", ".join(f"{v:.4f}" for v in std),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- quality checks


def content_hashes(images: np.ndarray) -> list[str]:
    """SHA-1 of each decoded image's pixels: equal pixels, equal hash, whatever the file name or container."""
    return [hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images]


def duplicates_within(ids: list[str], labels: list[str], hashes: list[str]) -> pd.DataFrame:
    """Rows of images whose pixels equal another image's, grouped; 'labels agree' flags conflicting labels."""
    import pandas as pd

    frame = pd.DataFrame({"id": ids, "label": labels, "hash": hashes})
    repeated = frame[frame["hash"].duplicated(keep=False)].copy()
    repeated["group"] = repeated.groupby("hash", sort=False).ngroup() + 1
    repeated["labels agree"] = repeated.groupby("hash")["label"].transform("nunique") == 1
    return repeated[["group", "id", "label", "labels agree"]].reset_index(drop=True)


def perceptual_hashes(images: np.ndarray, name: str = "images") -> np.ndarray:
    """64-bit pHash (imagehash) of each image as uint64, for Hamming distances with numpy."""
    import imagehash
    from PIL import Image

    shown = progress_bar(images, desc=f"perceptual hashes of {name}", total=len(images))
    return np.array(
        [int(str(imagehash.phash(Image.fromarray(np.asarray(image)))), 16) for image in shown], dtype=np.uint64
    )


def train_test_matches(
    train_ids: list[str],
    train_labels: list[str],
    train_hashes: list[str],
    train_phash: np.ndarray,
    test_ids: list[str],
    test_hashes: list[str],
    test_phash: np.ndarray,
    max_distance: int,
) -> pd.DataFrame:
    """Test images that equal (same pixel hash) or nearly equal (pHash distance <= max_distance) a training image."""
    import pandas as pd

    distances = np.bitwise_count(test_phash[:, None] ^ train_phash[None, :])
    nearest = distances.argmin(axis=1)
    nearest_distance = distances[np.arange(len(test_ids)), nearest]
    exact = {h: i for i, h in enumerate(train_hashes)}
    rows = []
    for t, test_id in enumerate(test_ids):
        match = exact.get(test_hashes[t])
        if match is not None or nearest_distance[t] <= max_distance:
            j = nearest[t] if match is None else match
            rows.append(
                {
                    "test id": test_id,
                    "train id": train_ids[j],
                    "train label": train_labels[j],
                    "kind": "exact" if match is not None else "near",
                    "phash distance": int(distances[t, j]),
                }
            )
    return pd.DataFrame(rows, columns=["test id", "train id", "train label", "kind", "phash distance"])


def twin_psnr(lr_images: np.ndarray, hr_images: np.ndarray) -> np.ndarray:
    """PSNR (dB) of each LR image against its HR twin shrunk to the LR size (PIL bicubic, as the cache does)."""

    size = lr_images.shape[1]
    values = np.empty(len(lr_images))
    for index, (lr, hr) in enumerate(
        progress_bar(zip(lr_images, hr_images), desc="comparing LR/HR twins", total=len(lr_images))
    ):
        shrunk = fit_square(np.asarray(hr), size).astype(np.float32) / 255
        mse = np.mean((shrunk - np.asarray(lr, dtype=np.float32) / 255) ** 2)
        values[index] = 10 * np.log10(1.0 / max(float(mse), 1e-10))
    return values


# --------------------------------------------------------------------------- figures


def sample_grid_png(table: ImageTable, lr: np.ndarray, hr: np.ndarray | None, path: Path) -> Path:
    """Two images for each of a few classes spread over the class list: LR 64 beside its HR twin, same size."""

    classes = sorted(set(table.labels))
    chosen = [
        classes[i] for i in np.linspace(0, len(classes) - 1, min(SAMPLE_CLASSES, len(classes))).round().astype(int)
    ]
    images, titles = [], []
    for label in dict.fromkeys(chosen):
        for index in [i for i, name in enumerate(table.labels) if name == label][:2]:
            images.append(lr[index])
            titles.append(f"{label} (LR {lr.shape[1]})")
            if hr is not None:
                images.append(hr[index])
                titles.append(f"HR twin {hr.shape[1]}")
    return image_grid_png(images, titles, path, columns=4)


def pairs_png(
    left: list[np.ndarray], right: list[np.ndarray], left_titles: list[str], right_titles: list[str], path: Path
) -> Path:

    images = [image for pair in zip(left, right) for image in pair]
    titles = [title for pair in zip(left_titles, right_titles) for title in pair]
    return image_grid_png(images, titles, path, columns=4)


def leakage_check(
    table: ImageTable,
    test: ImageTable,
    lr: np.ndarray,
    test_pixels: np.ndarray,
    train_hashes: list[str],
    max_distance: int,
    out: Path,
) -> tuple[pd.DataFrame, list[str | Path | pd.DataFrame]]:
    """(matches table, page items): test images equal or near-equal to a training image, with example pairs."""
    leaks = train_test_matches(
        table.ids,
        table.labels,
        train_hashes,
        perceptual_hashes(lr, "train"),
        test.ids,
        content_hashes(test_pixels),
        perceptual_hashes(test_pixels, "test"),
        max_distance,
    )
    write_csv(out / "leakage_train_test.csv", leaks)
    items: list = [
        f"Train/test leakage: {int((leaks['kind'] == 'exact').sum())} test image(s) equal a training image, "
        f"{int((leaks['kind'] == 'near').sum())} more are near-duplicates (pHash Hamming distance <= {max_distance} of "
        "64 bits).",
        leaks.head(EXAMPLES),
    ]
    if len(leaks):
        train_index, test_index = {i: k for k, i in enumerate(table.ids)}, {i: k for k, i in enumerate(test.ids)}
        shown = leaks.head(EXAMPLES)
        items.append(
            pairs_png(
                [test_pixels[test_index[i]] for i in shown["test id"]],
                [lr[train_index[i]] for i in shown["train id"]],
                [f"test {i}" for i in shown["test id"]],
                [
                    f"train {i} ({k}, d={d})"
                    for i, k, d in zip(shown["train id"], shown["kind"], shown["phash distance"])
                ],
                out / "leakage_examples.png",
            )
        )
    return leaks, items


def twin_check(
    table: ImageTable, lr: np.ndarray, hr: np.ndarray, threshold_db: float, out: Path
) -> tuple[pd.DataFrame, list[str | Path | pd.DataFrame]]:
    """(mismatched rows, page items): LR/HR pairs whose PSNR is below the threshold, and the lowest pairs drawn."""
    import pandas as pd

    psnr = twin_psnr(lr, hr)
    twins = pd.DataFrame({"id": table.ids, "label": table.labels, "psnr_db": psnr}).sort_values(
        "psnr_db", kind="stable"
    )
    write_csv(out / "twin_psnr.csv", twins)
    worst = twins.head(EXAMPLES)
    items = [
        f"LR/HR twin mismatch: {int((psnr < threshold_db).sum())} pair(s) with PSNR < {threshold_db:g} dB between the "
        "LR image "
        f"and its HR twin shrunk to {lr.shape[1]} (median {np.median(psnr):.1f} dB, lowest {psnr.min():.1f} dB). The "
        "lowest pairs:",
        worst,
        pairs_png(
            [lr[i] for i in worst.index],
            [hr[i] for i in worst.index],
            [f"{table.ids[i]} LR" for i in worst.index],
            [f"HR twin, {p:.1f} dB" for p in worst["psnr_db"]],
            out / "twin_lowest_psnr.png",
        ),
    ]
    return twins[twins["psnr_db"] < threshold_db], items


# --------------------------------------------------------------------------- the command


def write_eda(data_dir: Path, out: Path, phash_distance: int, twin_psnr_db: float) -> Path:
    """All tables, figures and eda.html for a data folder; prints a summary; returns the page."""
    require_extra("eda", "eda (perceptual hashes for the near-duplicate check)")
    started = time.perf_counter()
    table = load_train_table(data_dir, check_labels=False)  # reported below, not refused
    test = load_test_table(data_dir) if (data_dir / "test.csv").is_file() else None
    folders = [Folder("train", table.lr_paths, LR_SIZE)]
    if table.hr_paths is not None:
        folders.append(Folder("upscale_train", table.hr_paths, HR_SIZE))
    if test is not None:
        folders.append(Folder("test", test.lr_paths, LR_SIZE))
    # decoded before anything is written: an unreadable image is refused with the output folder untouched
    pixels = {folder.name: load_images(folder.paths, folder.size) for folder in folders}
    out.mkdir(parents=True, exist_ok=True)

    counts = class_counts(table.labels)
    write_csv(out / "class_counts.csv", counts)
    imbalance = counts["count"].iloc[0] / counts["count"].iloc[-1]
    counts_png = barh_png(
        counts["label"].tolist(),
        counts["count"].tolist(),
        out / "class_counts.png",
        f"training images per class ({len(counts)} classes)",
        "images",
    )

    stats = image_stats(folders, pixels)
    write_csv(out / "image_stats.csv", stats)
    lr, hr = pixels["train"], pixels.get("upscale_train")
    samples = sample_grid_png(table, lr, hr, out / "samples.png")

    train_hashes = content_hashes(lr)
    duplicates = duplicates_within(table.ids, table.labels, train_hashes)
    write_csv(out / "duplicates_train.csv", duplicates)
    unlabelled = [image_id for image_id, label in zip(table.ids, table.labels) if label == ""]
    single = counts.loc[(counts["count"] < 2) & (counts["label"] != ""), "label"].tolist()
    labels_line = (
        f"Labels: {len(unlabelled)} image(s) without a label"
        + (f" (first: {', '.join(unlabelled[:3])})" if unlabelled else "")
        + f", {len(single)} class(es) of a single image"
        + (f" ({', '.join(single[:3])})" if single else "")
        + ("; train refuses both: label every image, give every class at least 2" if unlabelled or single else "")
    )
    quality: list = [
        labels_line,
        "Exact duplicates inside train (equal decoded pixels): "
        f"{duplicates['group'].nunique() if len(duplicates) else 0} group(s), "
        f"{len(duplicates)} images, {int((~duplicates['labels agree']).sum())} with conflicting labels.",
        duplicates.head(2 * EXAMPLES),
    ]
    leaks, mismatched = None, None
    if test is not None:
        leaks, items = leakage_check(table, test, lr, pixels["test"], train_hashes, phash_distance, out)
        quality += items
    if hr is not None:
        mismatched, items = twin_check(table, lr, hr, twin_psnr_db, out)
        quality += items

    normalisation = "\n".join(
        f"{row['folder']:>13}: mean=({row['mean (R, G, B)']})  std=({row['std (R, G, B)']})"
        for _, row in stats.iterrows()
    )
    summary = (
        f"{len(table)} training images, {len(counts)} classes, {counts['count'].iloc[-1]}-{counts['count'].iloc[0]} "
        "per class "
        f"(imbalance ratio {imbalance:.2f})" + (f"; {len(test)} test images" if test is not None else "")
    )
    write_page(
        out / "eda.html",
        f"Data overview: {data_dir}",
        [
            Section("Summary", [summary]),
            Section("Classes", [f"Imbalance ratio (largest / smallest class): {imbalance:.2f}", counts_png, counts]),
            Section("Images", [stats, "Normalisation values (pixels in [0, 1]):\n" + normalisation]),
            Section("Samples: LR 64x64 beside its HR twin, drawn at the same size", [samples]),
            Section("Data quality", quality),
        ],
    )
    print(summary)
    print(stats[["folder", "images", "sizes", "modes", "formats"]].to_string(index=False))
    print("normalisation values (pixels in [0, 1]):\n" + normalisation)
    print(labels_line[0].lower() + labels_line[1:])
    print(
        f"exact duplicates in train: {len(duplicates)} images"
        + (
            f"; train/test exact: {int((leaks['kind'] == 'exact').sum())}, near (pHash <= {phash_distance}): "
            f"{int((leaks['kind'] == 'near').sum())}"
            if leaks is not None
            else ""
        )
    )
    if mismatched is not None:
        print(
            f"LR/HR twins below {twin_psnr_db:g} dB PSNR: {len(mismatched)}"
            + (f" (first: {', '.join(mismatched['id'].head(3))})" if len(mismatched) else "")
        )
    print(f"eda finished in {time.perf_counter() - started:.1f}s; page: {out / 'eda.html'}")
    return out / "eda.html"
