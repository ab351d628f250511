"""Training throughput (images/s) of the cpu recipe's model and of BEiT-base@224, with the options that matter.

Every variant except ``beit-reference`` runs training's own ``train_one_epoch`` (gather, augmentation, in-model
resize, forward, backward, AdamW step, through accelerate) on a few batches after warm-up batches; each runs in
its own process (accelerate's state is per process, torch.compile caches too). ``beit-reference`` is the
reference's loop: its PIL/BeitImageProcessor loader (see input_pipeline.py) and a plain fp32 PyTorch loop.
BEiT is randomly initialised from a local BeitConfig shaped like microsoft/beit-base-patch16-224-pt22k.

    python benchmarks/train_throughput.py                          # the CPU set
    python benchmarks/train_throughput.py --device cuda --only beit-reference,beit-bf16,lite0-224
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _machine import OtherLoad, add_record_args, benchmark_data, describe_machine, record

from lowres_birds.runtime import keep_freed_memory


@dataclass(frozen=True)
class Variant:
    description: str
    model: str  # "lite0" (recipe cpu) or "beit" (recipe beit-seed)
    overrides: dict = field(default_factory=dict)
    compile: bool = False


VARIANTS = {
    "lite0": Variant("efficientnet_lite0, cpu.yaml as is (freeze 2, 64->128, fp32, batch 32)", "lite0"),
    "lite0-channels-last": Variant(
        "  cpu.yaml + channels_last weights (batches are channels_last either way)", "lite0", {"channels_last": True}
    ),
    "lite0-no-freeze": Variant("  cpu.yaml with freeze_blocks 0", "lite0", {"freeze_blocks": 0}),
    "lite0-bf16": Variant("  cpu.yaml + bf16 autocast", "lite0", {"mixed_precision": "bf16"}),
    "lite0-compile": Variant("  cpu.yaml + torch.compile (compile time excluded)", "lite0", compile=True),
    "lite0-batch64": Variant("  cpu.yaml with batch 64", "lite0", {"batch_size": 64}),
    "lite0-224": Variant("efficientnet_lite0 at 64->224 (cpu.yaml otherwise)", "lite0", {"strategy": "upscale:224"}),
    "lite0-224-bf16": Variant(
        "efficientnet_lite0 at 64->224 + bf16", "lite0", {"strategy": "upscale:224", "mixed_precision": "bf16"}
    ),
    "beit": Variant("BEiT-base@224, beit-seed recipe (fp32, batch 16)", "beit"),
    "beit-channels-last": Variant("  BEiT + channels_last", "beit", {"channels_last": True}),
    "beit-bf16": Variant("  BEiT + bf16 autocast", "beit", {"mixed_precision": "bf16"}),
    "beit-reference": Variant("  BEiT, the reference's loop (PIL loader, plain fp32 loop)", "beit"),
}
# Not beit-bf16 on CPUs: without AVX512-BF16/AMX torch's bf16 matmul falls back to a single-threaded reference
# GEMM (3 batches of 16 did not finish in 18 minutes on the 2-core AMD EPYC).
CPU_SET = ("lite0", "lite0-channels-last", "lite0-no-freeze", "lite0-bf16", "lite0-compile", "lite0-batch64", "beit")
# (warm-up batches, timed batches) per model and device; BEiT-base trains at ~1.5 images/s on 2 CPU cores.
STEPS = {("lite0", "cpu"): (3, 12), ("beit", "cpu"): (1, 2), ("lite0", "cuda"): (10, 60), ("beit", "cuda"): (10, 40)}


def beit_config_dir(tiny: bool) -> Path:
    """A local folder with a BEiT config (base, as the pt22k checkpoint; tiny for dry runs), so hf: loads offline."""
    from transformers import BeitConfig

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37) if tiny else {}
    config = BeitConfig(
        image_size=224,
        patch_size=16,
        use_absolute_position_embeddings=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=0.1,
        use_mean_pooling=True,
        **shape,
    )
    folder = Path(tempfile.mkdtemp(prefix="beit-config-"))
    config.save_pretrained(folder)
    return folder


def run_variant(
    name: str, data_dir: Path, device: str, warmup: int, steps: int, tiny: bool, around_timed=None
) -> float:
    """Images/s of one variant over ``steps`` batches after ``warmup`` batches (in this process).

    ``around_timed``: optional context manager entered around the timed batches (the profiler).
    """
    import numpy as np
    from _training import timed_training

    from lowres_birds.config import load_config
    from lowres_birds.train.data import load_training_data

    variant = VARIANTS[name]
    beit = variant.model == "beit"
    overrides = {"device": device, **variant.overrides}
    if beit:
        overrides |= {"model": f"hf:{beit_config_dir(tiny)}", "pretrained": False}
    cfg = load_config("beit-seed" if beit else "cpu", overrides)
    if name == "beit-reference":
        data = load_training_data(data_dir, cfg)
        batches = np.resize(data.train_idx, (warmup + steps) * cfg.batch_size)  # repeats indices on small data sets
        return reference_loop(cfg, data, batches, device, warmup)
    images_per_s, _ = timed_training(cfg, data_dir, warmup, steps, compile=variant.compile, around_timed=around_timed)
    return images_per_s


def reference_loop(cfg, data, batches, device: str, warmup: int) -> float:
    """The reference's training loop: PIL loader, BeitForImageClassification(labels=...), fp32 AdamW, no accelerate."""
    import torch
    from input_pipeline import ReferenceDataset
    from torch.utils.data import DataLoader, Subset
    from transformers import AutoConfig, BeitForImageClassification

    config = AutoConfig.from_pretrained(cfg.model[3:], num_labels=len(data.label_map.classes))
    model = BeitForImageClassification(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    dataset = Subset(ReferenceDataset(data.table.lr_paths, data.targets, 224, pil_backend=True), batches.tolist())
    seen = 0
    for step, (pixels, labels) in enumerate(DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True)):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started, seen = time.perf_counter(), 0
        loss = model(pixel_values=pixels.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen += len(labels)
        loss.item()  # the reference logged the running loss every step
    return seen / (time.perf_counter() - started)


INPUT_STAGES = {
    "gather": "BatchGather.__call__",
    "augment": "augment_batch",
    "resize + normalise": "BirdNet.preprocess",
}


def profile_variant(
    name: str, data_dir: Path, device: str, warmup: int, steps: int
) -> tuple[float, dict[str, float], dict[str, float], str]:
    """One variant under torch.profiler, input stages labelled.

    Returns (seconds per step, seconds per step per input stage, kernel time and page faults per step, op table).
    """
    import contextlib
    import functools
    import resource

    from torch.profiler import ProfilerActivity, profile, record_function

    from lowres_birds.model import wrapper
    from lowres_birds.train import batches, data

    def label(owner, attribute: str, text: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def labelled(*args, **kwargs):
            with record_function(text):
                return original(*args, **kwargs)

        setattr(owner, attribute, labelled)

    label(batches.BatchGather, "__call__", INPUT_STAGES["gather"])
    label(data, "random_crop_flip", INPUT_STAGES["augment"])
    label(wrapper.BirdNet, "preprocess", INPUT_STAGES["resize + normalise"])
    profiler = profile(activities=[ProfilerActivity.CPU])
    measured = {}

    @contextlib.contextmanager
    def profiled():
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        with profiler:
            yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        measured.update(
            wall=time.perf_counter() - started,
            kernel=after.ru_stime - before.ru_stime,
            faults=after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt,
        )

    run_variant(name, data_dir, device, warmup, steps, tiny=False, around_timed=profiled())
    totals = {event.key: event.cpu_time_total / 1e6 for event in profiler.key_averages()}
    stages = {stage: totals.get(text, 0.0) / steps for stage, text in INPUT_STAGES.items()}
    system = {"kernel time (all threads)": measured["kernel"] / steps, "page faults": measured["faults"] / steps}
    return (
        measured["wall"] / steps,
        stages,
        system,
        profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, help="competition folder (default ../shared/data/cub100-lr, else synthetic)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--only", help=f"comma-separated variants (default: {','.join(CPU_SET)}); all: {','.join(VARIANTS)}"
    )
    parser.add_argument("--steps", type=int, help="timed batches per variant (default: per model and device)")
    parser.add_argument("--warmup", type=int, help="untimed batches first (default: per model and device)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over the variants, interleaved; medians are reported"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny data and BEiT, 1+1 batches, no record: checks the script runs"
    )
    parser.add_argument(
        "--profile",
        metavar="VARIANT",
        help="profile one variant's timed batches instead (torch.profiler): input-handling share of a step",
    )
    parser.add_argument(
        "--glibc-default-malloc", action="store_true", help="skip runtime.keep_freed_memory (to measure what it saves)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one variant in this process, print JSON
    add_record_args(parser)
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CPU_SET)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.dry_run:
        args.steps, args.warmup, args.no_record = 1, 1, True
    if not args.glibc_default_malloc:
        keep_freed_memory()

    if args.child:
        warmup, steps = STEPS[(VARIANTS[args.child].model, args.device)]
        rate = run_variant(args.child, args.data, args.device, args.warmup or warmup, args.steps or steps, args.dry_run)
        print(json.dumps({"images_per_s": rate}))
        return 0

    data_dir = benchmark_data(args.data, small=args.dry_run)
    machine = describe_machine(args.device)
    if args.profile:
        return profile(args, data_dir, machine)
    runs: dict[str, list[float]] = {name: [] for name in names}
    with OtherLoad() as load:
        # interleaved: drifts in machine speed hit all alike
        for _, name in itertools.product(range(args.repeats), names):
            command = [sys.executable, __file__, "--child", name, "--data", str(data_dir), "--device", args.device]
            command += [
                f"--{flag}={value}" for flag, value in (("steps", args.steps), ("warmup", args.warmup)) if value
            ]
            command += [
                flag
                for flag, on in (("--dry-run", args.dry_run), ("--glibc-default-malloc", args.glibc_default_malloc))
                if on
            ]
            started = time.perf_counter()
            # Compile in-process during warm-up: inductor's background compile workers would otherwise still
            # be busy during the timed batches.
            env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"} if VARIANTS[name].compile else None
            child = subprocess.run(command, capture_output=True, text=True, env=env)
            if child.returncode != 0:
                sys.stderr.write(child.stderr[-3000:])
                raise SystemExit(f"variant {name} failed (exit {child.returncode})")
            runs[name].append(json.loads(child.stdout.strip().splitlines()[-1])["images_per_s"])
            print(
                f"{name:24s} {runs[name][-1]:9.2f} img/s   ({time.perf_counter() - started:.0f}s)  "
                f"{VARIANTS[name].description.strip()}",
                flush=True,
            )
    results = {name: statistics.median(rates) for name, rates in runs.items()}
    fastest_lite0 = max(
        (n for n in results if VARIANTS[n].model == "lite0" and "224" not in n), key=results.get, default=None
    )
    body = ["| variant | what | training images/s (median) | all runs |", "|---|---|---|---|"]
    body += [
        f"| {name} | {VARIANTS[name].description.strip()} | {rate:.2f} | {', '.join(f'{r:.1f}' for r in runs[name])} |"
        for name, rate in results.items()
    ]
    summary = "training throughput: " + ", ".join(f"{name} {rate:.1f} img/s" for name, rate in results.items())
    if fastest_lite0:
        summary += f"; fastest lite0 option at 128: {fastest_lite0}"
    allocator = (
        "glibc default malloc"
        if args.glibc_default_malloc
        else "freed memory kept (runtime.keep_freed_memory, as the CLI)"
    )
    body += [
        "",
        f"Data: {data_dir.name}; {allocator}; each run in its own process; {args.repeats} interleaved round(s).",
        "",
        f"Result: {summary}",
    ]
    record(args, "Training throughput (benchmarks/train_throughput.py)", machine, load, body)
    print(summary)
    return 0


def profile(args: argparse.Namespace, data_dir: Path, machine: str) -> int:
    if args.profile not in VARIANTS or args.profile == "beit-reference":
        raise SystemExit(f"--profile takes one of {', '.join(n for n in VARIANTS if n != 'beit-reference')}")
    warmup, steps = STEPS[(VARIANTS[args.profile].model, args.device)]
    with OtherLoad() as load:
        step_s, stages, system, table = profile_variant(
            args.profile, data_dir, args.device, args.warmup or warmup, args.steps or steps
        )
    print(table)
    share = sum(stages.values()) / step_s
    allocator = (
        "glibc default" if args.glibc_default_malloc else "freed memory kept (runtime.keep_freed_memory, as the CLI)"
    )
    body = ["| stage | ms per step | share of the step |", "|---|---|---|"]
    body += [f"| {stage} | {seconds * 1000:.1f} | {seconds / step_s:.1%} |" for stage, seconds in stages.items()]
    body.append(f"| whole step (profiled) | {step_s * 1000:.1f} | 100% |")
    body.append(
        f"| kernel time (all threads), mostly page faults | {system['kernel time (all threads)'] * 1000:.1f} | |"
    )
    summary = (
        f"profile {args.profile} ({allocator}): input handling (gather + augment + resize/normalise) is {share:.1%} of "
        "a "
        f"{step_s * 1000:.0f} ms training step ("
        + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in stages.items())
        + f"); {system['page faults']:.0f} page faults per step"
    )
    body += [
        "",
        f"Data: {data_dir.name}; {args.steps or steps} profiled steps after {args.warmup or warmup}.",
        "",
        f"Result: {summary}",
    ]
    record(args, "Training step profile (benchmarks/train_throughput.py --profile)", machine, load, body)
    print("\n".join(body[:-2]))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
