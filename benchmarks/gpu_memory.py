"""GPU memory of a recipe's training step, with and without grad checkpointing: estimated on a CPU, or measured on a
GPU.

Estimate (any CPU, seconds; no weights, no network):

- model state, counted from the real architecture built on the meta device (no memory, no weights): fp32 weights
  (4 B per parameter), fp32 gradients (4 B per trainable one), AdamW's two moments (8 B), the EMA copy (4 B, when
  ``ema_decay`` > 0);
- activations, measured: the real architecture with 1 and with 2 blocks (the blocks of these ViTs are identical, so
  memory is linear in depth) runs one forward pass on the CPU for one image at the recipe's input size, under the
  recipe's autocast precision, in training mode; every tensor autograd saves for the backward pass is counted once
  (by storage, parameters excluded; the bf16 copies of the weights autocast keeps are included). That is scaled to
  the real depth and to the recipe's batch size. With grad checkpointing, the blocks keep only their inputs, and one
  block's activations are rebuilt at a time in the backward pass (added once).

Not counted: the CUDA context and the caching allocator's slack (typically 1-3 GB together), cuDNN/cuBLAS workspaces,
the backward pass's transient gradient buffers beyond one block. CPU and CUDA attention kernels save similar tensors
(fused attention: no N x N matrix), so read the figures as estimates within ~20%.

Measure (``--measure``, on a GPU, used by gpu.sh): the recipe's real architecture, randomly initialised
(``--no-pretrained``: no network needed), trains a few steps through training's own ``train_one_epoch`` on the data;
prints images/s and ``torch.cuda.max_memory_allocated``. The HR teacher and the HR views are left out (the teacher's
features are computed before training; they are not what fills the GPU).

    python benchmarks/gpu_memory.py --recipe best --recipe beit-seed            # estimate, on a CPU
    python benchmarks/gpu_memory.py --measure --recipe best --device cuda       # measure, on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _machine import benchmark_data

from lowres_birds.runtime import keep_freed_memory

GIB = 2**30
NUM_CLASSES = 25  # the competition's species (the head is a rounding error either way)


def model_config_source(model: str, tiny: bool = False) -> str:
    """The recipe's model id, or for the reference's Hub BEiT a local config shaped like it (no network here)."""
    from train_throughput import beit_config_dir

    if model.startswith("hf:") and "beit-base-patch16-224-pt22k" in model:
        return f"hf:{beit_config_dir(tiny)}"
    if model.startswith("hf:") and not Path(model[3:]).is_dir():
        raise SystemExit(f"{model}: pass a local directory (--model hf:DIR) to estimate it offline")
    return model


def build(source: str, input_size: int, depth: int | None = None):
    """The architecture of ``source`` as a BirdNet, randomly initialised, optionally with only ``depth`` blocks."""
    from lowres_birds.model.factory import create_model

    if depth is None:
        return create_model(source, [str(i) for i in range(NUM_CLASSES)], input_size, pretrained=False)
    if source.startswith("hf:"):
        from transformers import AutoConfig, AutoModelForImageClassification

        from lowres_birds.model.wrapper import BirdNet, ModelSpec

        config = AutoConfig.from_pretrained(source[3:], num_labels=NUM_CLASSES, num_hidden_layers=depth)
        return BirdNet(
            AutoModelForImageClassification.from_config(config),
            ModelSpec(source, NUM_CLASSES, input_size, (0.5,) * 3, (0.5,) * 3),
        )
    import timm
    from timm.models import get_pretrained_cfg

    from lowres_birds.model.wrapper import BirdNet, ModelSpec

    name = source.removeprefix("timm:")
    sized = {"img_size": input_size} if getattr(get_pretrained_cfg(name), "fixed_input_size", False) else {}
    backbone = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, depth=depth, **sized)
    return BirdNet(backbone, ModelSpec(source, NUM_CLASSES, input_size, (0.5,) * 3, (0.5,) * 3))


def blocks_of(model, depth: int):
    """The repeated blocks: the largest ModuleList/Sequential with ``depth`` entries."""
    from torch import nn

    stacks = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == depth]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def saved_bytes(model, cfg, checkpointing: bool) -> int:
    """Bytes autograd keeps from one image's forward pass to its backward pass (each storage once, parameters
    excluded); with checkpointing, plus the block inputs the checkpoints keep."""
    import torch

    if checkpointing:
        model.enable_grad_checkpointing()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def block_input(module, args) -> None:
        kept[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()

    hooks = (
        [block.register_forward_pre_hook(block_input) for block in blocks_of(model, depth_of(model))]
        if checkpointing
        else []
    )
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model.train()(images, return_features=cfg.feature_kd_weight > 0 and hasattr(model.backbone, "forward_head"))
    for hook in hooks:
        hook.remove()
    return sum(kept.values())


def depth_of(model) -> int:
    config = getattr(model.backbone, "config", None)
    return config.num_hidden_layers if config is not None else len(model.backbone.blocks)


def estimate(recipe: str) -> dict:
    """Model state and activations (GiB) of one recipe's training step, without and with grad checkpointing."""
    import torch

    from lowres_birds.config import load_config, parse_strategy

    cfg = load_config(recipe)
    size = parse_strategy(cfg.strategy).input_size
    source = model_config_source(cfg.model)
    with torch.device("meta"):
        full = build(source, size)
    full.freeze_early_layers(cfg.freeze_blocks)
    params = sum(p.numel() for p in full.parameters())
    trainable = sum(p.numel() for p in full.parameters() if p.requires_grad)
    depth = depth_of(full)
    state = {
        "weights": 4 * params,
        "gradients": 4 * trainable,
        "AdamW moments": 8 * trainable,
        "EMA copy": 4 * params if cfg.ema_decay else 0,
    }
    per_image = {}
    for checkpointing in (False, True):
        one, two = (saved_bytes(build(source, size, d), cfg, checkpointing) for d in (1, 2))
        per_image[checkpointing] = one + (depth - 1) * (two - one)
        if not checkpointing:
            block = two - one  # one block's activations: what the backward pass rebuilds at a time under checkpointing
    activations = {False: per_image[False] * cfg.batch_size, True: (per_image[True] + block) * cfg.batch_size}
    return {
        "recipe": recipe,
        "model": cfg.model,
        "input": size,
        "batch": cfg.batch_size,
        "precision": cfg.mixed_precision,
        "depth": depth,
        "params_m": params / 1e6,
        "trainable_m": trainable / 1e6,
        "state_gib": sum(state.values()) / GIB,
        "state": {k: v / GIB for k, v in state.items()},
        "activations_gib": {k: v / GIB for k, v in activations.items()},
        "total_gib": {k: (sum(state.values()) + v) / GIB for k, v in activations.items()},
    }


def measure(
    recipe: str, data_dir: Path, device: str, warmup: int, steps: int, tiny: bool, checkpointing: bool | None
) -> dict:
    """Images/s and peak GPU memory of the recipe's real (randomly initialised) model over ``steps`` training steps."""
    import torch
    from _training import timed_training

    from lowres_birds.config import load_config

    overrides = {
        "model": model_config_source(load_config(recipe).model, tiny),
        "pretrained": False,
        "device": device,
        "hr_view_ratio": 0.0,
        "kd_weight": 0.0,
        "feature_kd_weight": 0.0,
        "folds": 0,
        "grad_checkpointing": checkpointing,
    }
    if tiny:  # a dry run on a CPU: the real code path at a toy size
        overrides |= {
            "strategy": "upscale:32",
            "batch_size": 2,
            "model": "timm:test_vit" if not overrides["model"].startswith("hf:") else overrides["model"],
        }
    cfg = load_config(recipe, overrides)
    images_per_s, session = timed_training(cfg, data_dir, warmup, steps)
    cuda = session.parts.accelerator.device.type == "cuda"
    return {
        "recipe": recipe,
        "grad_checkpointing": cfg.grad_checkpointing,
        "images_per_s": images_per_s,
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--recipe", action="append", required=True, help="a GPU recipe (repeatable)")
    parser.add_argument(
        "--measure", action="store_true", help="train a few steps on --device and report images/s and peak GPU memory"
    )
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="with --measure")
    parser.add_argument(
        "--data",
        type=Path,
        help="with --measure: competition folder (default ../shared/data/cub100-lr, else synthetic)",
    )
    parser.add_argument("--steps", type=int, default=5, help="with --measure: timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="with --measure: untimed optimizer steps first")
    parser.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --measure: override the recipe's",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="with --measure: a toy size on any device, to check the script runs"
    )
    args = parser.parse_args()
    keep_freed_memory()
    if args.measure:
        if len(args.recipe) > 1:
            parser.error("--measure takes one --recipe per process (accelerate keeps one mixed precision per process)")
        started = time.perf_counter()
        steps = 1 if args.dry_run else args.steps
        result = measure(
            args.recipe[0],
            benchmark_data(args.data, small=args.dry_run),
            args.device,
            args.warmup,
            steps,
            args.dry_run,
            args.grad_checkpointing,
        )
        print(
            f"{args.recipe[0]} (grad checkpointing {'on' if result['grad_checkpointing'] else 'off'}): "
            f"{result['images_per_s']:.1f} img/s, "
            f"max_memory_allocated {result['max_memory_allocated_gib']:.1f} GiB ({time.perf_counter() - started:.0f}s)",
            flush=True,
        )
        return 0
    print(
        "| recipe | model | params | input, batch, precision | model state | activations | estimated total | with grad "
        "checkpointing |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipe:
        r = estimate(recipe)
        print(
            f"| {recipe} | {r['model']} ({r['depth']} blocks) | {r['params_m']:.0f}M | {r['input']}, {r['batch']}, "
            f"{r['precision']} | "
            f"{r['state_gib']:.1f} GiB | {r['activations_gib'][False]:.1f} GiB | {r['total_gib'][False]:.1f} GiB | "
            f"{r['total_gib'][True]:.1f} GiB (activations {r['activations_gib'][True]:.1f}) |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
