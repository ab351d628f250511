"""The embedded default: a small synthetic bird set in the competition layout, made offline in seconds.

Each "species" is a procedurally drawn bird (body colour, wing colour, head shape, tail length, belly
pattern) on a varied background, drawn at 256x256 and degraded to 64x64 (blur, bicubic shrink, JPEG),
so the demo exercises the same layout, HR twins and low-res gap as the real competition. The data is
synthetic: its scores say the pipeline works, nothing about real birds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from lowres_birds.run_dir import write_csv

HR, LR = 256, 64
SPECIES = [
    # name, body, wing, head shape, tail length, belly pattern
    ("Azure Finch", (40, 90, 200), (20, 40, 120), "round", 0.6, "plain"),
    ("Crimson Tanager", (200, 30, 40), (30, 30, 30), "round", 0.5, "plain"),
    ("Golden Warbler", (235, 200, 40), (120, 110, 30), "pointed", 0.7, "stripes"),
    ("Jade Kingfisher", (30, 160, 110), (20, 80, 140), "pointed", 0.4, "plain"),
    ("Ember Robin", (110, 80, 60), (80, 60, 50), "round", 0.6, "spots"),
    ("Snowy Plover", (225, 225, 220), (150, 140, 120), "round", 0.3, "spots"),
    ("Violet Swallow", (110, 50, 160), (60, 30, 90), "pointed", 1.2, "plain"),
    ("Slate Shrike", (120, 125, 135), (30, 30, 35), "pointed", 0.9, "stripes"),
]


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 25) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def draw_bird(species: int, rng: np.random.Generator) -> Image.Image:
    """One 256x256 RGB picture of a synthetic bird of the given species, in a random pose."""
    _, body, wing, head, tail, belly = SPECIES[species]
    sky = _jitter((rng.integers(90, 200), rng.integers(120, 210), rng.integers(140, 230)), rng, 10)
    ground = _jitter((70, 110, 50), rng, 30)
    image = Image.new("RGB", (HR, HR), sky)
    draw = ImageDraw.Draw(image)
    horizon = int(rng.integers(150, 220))
    draw.rectangle([0, horizon, HR, HR], fill=ground)
    for _ in range(int(rng.integers(2, 6))):  # leaves / clutter
        x, y, r = (int(v) for v in rng.integers([0, 0, 6], [HR, HR, 22]))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter((60, 120, 60), rng, 40))
    scale = rng.uniform(0.75, 1.15)
    cx, cy = rng.uniform(100, 156), rng.uniform(100, 150)
    facing = 1 if rng.random() < 0.5 else -1
    bw, bh = 70 * scale, 42 * scale
    tail_len = 60 * scale * tail
    draw.polygon(
        [
            (cx - facing * bw * 0.4, cy - 6 * scale),
            (cx - facing * (bw * 0.4 + tail_len), cy - 14 * scale),
            (cx - facing * (bw * 0.4 + tail_len), cy + 8 * scale),
        ],
        fill=_jitter(wing, rng, 15),
    )
    draw.ellipse([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], fill=_jitter(body, rng, 15))
    if belly == "stripes":
        for k in range(-2, 3):
            x = cx + k * 9 * scale
            draw.line([(x, cy), (x, cy + bh * 0.45)], fill=(40, 35, 30), width=max(2, int(3 * scale)))
    elif belly == "spots":
        for _ in range(7):
            sx, sy = cx + rng.uniform(-bw * 0.3, bw * 0.3), cy + rng.uniform(0, bh * 0.35)
            draw.ellipse([sx - 3 * scale, sy - 3 * scale, sx + 3 * scale, sy + 3 * scale], fill=(60, 40, 30))
    draw.ellipse([cx - bw * 0.3, cy - bh * 0.45, cx + bw * 0.2, cy + bh * 0.05], fill=_jitter(wing, rng, 15))
    hx, hy, hr = cx + facing * bw * 0.45, cy - bh * 0.5, 17 * scale
    if head == "round":
        draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=_jitter(body, rng, 15))
    else:
        draw.polygon(
            [(hx - hr, hy + hr * 0.6), (hx, hy - hr * 1.4), (hx + hr, hy + hr * 0.6)], fill=_jitter(body, rng, 15)
        )
    beak = 14 * scale
    draw.polygon(
        [(hx + facing * hr * 0.8, hy - 4), (hx + facing * (hr + beak), hy + 2), (hx + facing * hr * 0.8, hy + 6)],
        fill=(240, 170, 40),
    )
    draw.ellipse([hx + facing * 5 - 3, hy - 6, hx + facing * 5 + 3, hy], fill=(10, 10, 10))
    angle = rng.uniform(-12, 12)
    image = image.rotate(angle, resample=Image.BICUBIC, fillcolor=sky)
    return image


def degrade(image: Image.Image, rng: np.random.Generator, path: Path) -> None:
    """256 -> 64 as a camera/codec would: slight blur, bicubic shrink, JPEG at a random quality."""
    small = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2))).resize((LR, LR), Image.BICUBIC)
    small.save(path, quality=int(rng.integers(70, 95)))


def make_demo_dataset(
    out_dir: Path, train_per_class: int = 48, test_per_class: int = 16, seed: int = 0, classes: int | None = None
) -> Path:
    """Write train.csv, test.csv, sample_submission.csv, test_labels.csv and the three image folders."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    species = list(range(len(SPECIES) if classes is None else classes))
    for folder in ("train", "upscale_train", "test"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    order = [s for s in species for _ in range(train_per_class)]
    for index, s in enumerate(rng.permutation(order)):
        image_id = f"TRAIN_{index:05d}"
        picture = draw_bird(int(s), rng)
        picture.save(out_dir / "upscale_train" / f"{image_id}.jpg", quality=95)
        degrade(picture, rng, out_dir / "train" / f"{image_id}.jpg")
        train_rows.append((image_id, f"./train/{image_id}.jpg", f"./upscale_train/{image_id}.jpg", SPECIES[s][0]))
    order = [s for s in species for _ in range(test_per_class)]
    for index, s in enumerate(rng.permutation(order)):
        image_id = f"TEST_{index:05d}"
        degrade(draw_bird(int(s), rng), rng, out_dir / "test" / f"{image_id}.jpg")
        test_rows.append((image_id, f"./test/{image_id}.jpg", SPECIES[s][0]))
    write_csv(out_dir / "train.csv", pd.DataFrame(train_rows, columns=["id", "img_path", "upscale_img_path", "label"]))
    test = pd.DataFrame(test_rows, columns=["id", "img_path", "label"])
    write_csv(out_dir / "test.csv", test[["id", "img_path"]])
    write_csv(out_dir / "sample_submission.csv", test.assign(label=0)[["id", "label"]])
    write_csv(out_dir / "test_labels.csv", test[["id", "label"]])
    return out_dir
