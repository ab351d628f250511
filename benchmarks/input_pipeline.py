"""Input pipeline: images/s delivered as normalised 224x224 float batches ready for the model, ours vs the reference's.

ours: the decoded uint8 array from the cache -> training's DataLoader (``BatchGather`` index gather) -> the same
      ``BirdNet.preprocess`` training runs (8-bit PIL bicubic 64->224, normalisation) on --device. Measured without
      augmentation (the reference had none) and with the cpu recipe's augmentation (``random_crop_flip``).
reference: a copy of the reference's loader: per image PIL open -> torchvision Resize((224, 224), bicubic) ->
      BeitImageProcessor (the hub's microsoft/beit-base-patch16-224-pt22k preprocessor config, built locally) ->
      DataLoader(batch 16, shuffle, no workers) -> .to(device). Two processor back ends: the PIL/numpy one the
      reference ran (transformers 4.x ``BeitImageProcessor``, 5.x ``BeitImageProcessorPil``) and 5.x's torchvision one.

Both run in the same process, alternating, --repeats times; the medians and their ratio are printed.

    python benchmarks/input_pipeline.py                      # cub100-lr on CPU
    python benchmarks/input_pipeline.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _machine import OtherLoad, add_record_args, benchmark_data, describe_machine, record
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lowres_birds.config import LR_SIZE, load_config
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import LabelMap, load_train_table
from lowres_birds.model.wrapper import BirdNet, ModelSpec
from lowres_birds.runtime import keep_freed_memory
from lowres_birds.train.batches import make_loader, random_crop_flip


def reference_processor(size: int, pil_backend: bool):
    """The reference's BeitImageProcessor, configured as the hub's preprocessor_config.json (offline)."""
    from transformers import BeitImageProcessor, BeitImageProcessorPil

    cls = BeitImageProcessorPil if pil_backend else BeitImageProcessor
    return cls(
        do_resize=True,
        size={"height": size, "width": size},
        resample=Image.BILINEAR,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


class ReferenceDataset(Dataset):
    """The reference's Dataset: one JPEG per item, resized with torchvision, then the BEiT processor."""

    def __init__(self, paths: list[Path], labels: np.ndarray, size: int, pil_backend: bool):
        from torchvision import transforms

        self.paths, self.labels = paths, labels
        self.resize = transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC)
        self.processor = reference_processor(size, pil_backend)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = self.resize(Image.open(self.paths[index]).convert("RGB"))
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].squeeze(0)
        return pixels, int(self.labels[index])


def images_per_second(batches, limit: int, device: torch.device, prepare) -> float:
    """Pull batches until ``limit`` images, ``prepare`` each on the device; images/s including the final sync.

    Each batch is dropped before the next is asked for, as a training step is done with its batch.
    """
    started, seen = time.perf_counter(), 0
    for images, *_ in batches:  # (images, labels[, indices])
        pixels = prepare(images)
        seen += len(pixels)
        del pixels
        if seen >= limit:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, help="competition folder (default ../shared/data/cub100-lr, else synthetic)"
    )
    parser.add_argument("--device", default="cpu", help="where batches are made ready: cpu or cuda")
    parser.add_argument("--size", type=int, default=224, help="side of the batches delivered to the model")
    parser.add_argument("--batch-size", type=int, default=16, help="the reference's batch size")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions; medians are reported")
    parser.add_argument(
        "--reference-images", type=int, default=320, help="images per repetition for the (slow) reference loader"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny synthetic data, 2 repetitions, no record: checks the script runs"
    )
    add_record_args(parser)
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does
    if args.dry_run:
        args.repeats, args.reference_images, args.no_record = 2, 16, True
    device = torch.device(args.device)

    data_dir = benchmark_data(args.data, small=args.dry_run)
    table = load_train_table(data_dir)
    targets = LabelMap.fit(table.labels).encode(table.labels)
    started = time.perf_counter()
    images = load_images(table.lr_paths, LR_SIZE)  # decoded once, then memory-mapped from the cache
    load_s = time.perf_counter() - started
    indices = np.arange(len(images))
    wrapper = BirdNet(torch.nn.Identity(), ModelSpec("benchmark", 1, args.size, (0.5,) * 3, (0.5,) * 3)).to(device)
    cfg = load_config("cpu")
    generator = torch.Generator().manual_seed(0)

    def ours(augment: bool):
        loader = make_loader(images, targets, indices, args.batch_size, seed=0, shuffle=True)

        def prepare(batch: torch.Tensor) -> torch.Tensor:
            batch = batch.to(device, non_blocking=True)
            return wrapper.preprocess(
                random_crop_flip(batch, generator, cfg.crop_scale_min, cfg.hflip) if augment else batch
            )

        return lambda: images_per_second(loader, len(images), device, prepare)

    def reference(pil_backend: bool):
        dataset = ReferenceDataset(table.lr_paths, targets, args.size, pil_backend)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
        return lambda: images_per_second(loader, args.reference_images, device, lambda batch: batch.to(device))

    contenders = {
        "ours": ours(augment=False),
        "ours + cpu-recipe augmentation": ours(augment=True),
        "reference (PIL BeitImageProcessor)": reference(pil_backend=True),
        "reference (torchvision BeitImageProcessor)": reference(pil_backend=False),
    }
    with torch.inference_mode():
        for measure in contenders.values():
            measure()  # warm-up: page in the memory map, first-call allocations
        results = {name: [] for name in contenders}
        with OtherLoad() as load:
            for _ in range(args.repeats):
                for name, measure in contenders.items():
                    results[name].append(measure())
    medians = {name: statistics.median(values) for name, values in results.items()}
    reference_rate = medians["reference (PIL BeitImageProcessor)"]

    machine = describe_machine(args.device)
    print(f"data: {data_dir} ({len(images)} images; cache load {load_s:.2f}s)  machine: {machine}  {load.note()}")
    body = ["| pipeline | images/s (median) | all repetitions | vs reference (PIL) |", "|---|---|---|---|"]
    for name, values in results.items():
        repetitions = ", ".join(f"{v:.0f}" for v in values)
        row = f"| {name} | {medians[name]:.0f} | {repetitions} | {medians[name] / reference_rate:.1f}x |"
        body.append(row)
        print(row)
    summary = (
        f"input pipeline ({args.device}, {args.size}px, batch {args.batch_size}): ours {medians['ours']:.0f} img/s, "
        f"reference {reference_rate:.0f} img/s -> {medians['ours'] / reference_rate:.1f}x "
        f"({medians['ours + cpu-recipe augmentation'] / reference_rate:.1f}x with augmentation; "
        f"{medians['ours'] / medians['reference (torchvision BeitImageProcessor)']:.1f}x vs the torchvision processor)"
    )
    body += [
        "",
        f"Data: {data_dir.name} ({len(images)} training images, 64x64), {args.repeats} repetitions.",
        "",
        f"Result: {summary}",
    ]
    record(args, "Input pipeline (benchmarks/input_pipeline.py)", machine, load, body)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
