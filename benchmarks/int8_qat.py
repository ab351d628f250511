"""Quantization-aware tuning for int8, tried for the 99 % agreement target of ``export --int8`` (not reached:
BENCHMARKS.md, "int8: quantization-aware tuning"): a short fine-tune meant to make the network's int8 version
agree with its own fp32 version.

    python benchmarks/int8_qat.py --run runs/cpu --steps 400                  # onnxruntime calibrates the tuned model
    python benchmarks/int8_qat.py --run runs/cpu --steps 400 --tuned-ranges   # it uses the ranges tuning simulated

A copy of the network runs with torch's fake quantization placed where onnxruntime's QDQ quantizer puts its
quantizers (per-channel symmetric int8 weights of every convolution after the stem; per-tensor uint8 on the
stem's output, each convolution's output after its fused ReLU6 and every residual sum), and its weights are
trained to minimise KL(fp32 probabilities || fake-quant probabilities), the untouched fp32 network as teacher, on
the run's own training images made ambiguous by mixup, crops, blur and noise. Labels play no part. The tuned
float weights, BatchNorm folded, are exported and quantized as ``export --int8`` does; agreement is measured
against the run's original fp32 export.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch
import torch.nn.functional as F
from _machine import DEFAULT_DATA, OtherLoad, add_record_args, describe_machine, record
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, PerChannelMinMaxObserver
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lowres_birds.config import LR_SIZE
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_test_table
from lowres_birds.errors import UserError
from lowres_birds.metrics import score
from lowres_birds.model.factory import load_run_model
from lowres_birds.model.resolution import to_nchw
from lowres_birds.model.wrapper import BirdNet
from lowres_birds.predict.classifier import RUNTIME_VARIABLE, Classifier
from lowres_birds.predict.export import calibration_images, export_onnx, onnx_program, quantize_int8, training_images
from lowres_birds.progress import bar as progress_bar

BATCH = 32
MIXUP_FRACTION = 0.5


def conv_bn_pairs(backbone: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each convolution with the BatchNorm that follows it (timm EfficientNet/MobileNet order)."""
    pairs, conv = [], None
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, nn.BatchNorm2d) and conv is not None and module.num_features == conv.out_channels:
            pairs.append((conv, module))
            conv = None
    return pairs


@torch.no_grad()
def fold_batchnorm(model: BirdNet) -> None:
    """Scale each convolution by its BatchNorm and leave the BatchNorm an exact bias-only affine (weight 1,
    mean 0, variance 1 - eps), so fake-quantized weights are the ones onnxruntime will see after the exporter
    folds the pair, while the module tree, and so the export path, stays the run's own."""
    for conv, bn in conv_bn_pairs(model.backbone):
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight.copy_(weight)
        if conv.bias is not None:  # now carried by the BatchNorm's bias
            conv.bias.zero_()
        bn.bias.copy_(bias)
        bn.weight.fill_(1.0)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)


def weight_quantizer() -> FakeQuantize:
    """onnxruntime's per-channel int8 weights: symmetric, -127..127, scale max|w| / 127."""
    return FakeQuantize(
        observer=PerChannelMinMaxObserver,
        quant_min=-127,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )


def activation_quantizer() -> FakeQuantize:
    """onnxruntime's uint8 activations: per-tensor affine 0..255 (range tracked by a moving min/max)."""
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )


class FakeQuantized:
    """Fake quantization attached to a BirdNet with folded BatchNorm; ``remove()`` leaves the tuned float weights."""

    def __init__(self, model: BirdNet):
        backbone = model.backbone
        if not (hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks")):
            raise UserError(f"int8 tuning needs an EfficientNet/MobileNet-style timm model, not {model.spec.source}")
        self.model = model
        self.executed: list[FakeQuantize] = []  # activation quantizers in the order the graph computes them
        self.hooks = []
        for conv, bn in conv_bn_pairs(backbone):
            if conv is not backbone.conv_stem:
                parametrize.register_parametrization(conv, "weight", weight_quantizer())
            self._quantize_output(bn)  # the stem's output too: it is the first quantized convolution's input
        for block in backbone.blocks.modules():
            if getattr(block, "has_skip", False):
                self._quantize_output(block)  # the residual Add

    def _quantize_output(self, module: nn.Module) -> None:
        quantizer = activation_quantizer()
        module.add_module("output_quantizer", quantizer)

        def hook(_module, _inputs, output):
            if quantizer not in self.executed:
                self.executed.append(quantizer)
            return quantizer(output)

        self.hooks.append(module.register_forward_hook(hook))

    def observe(self, enabled: bool) -> None:
        """Track activation ranges (on) or keep them fixed (off)."""
        for module in self.model.modules():
            if isinstance(module, FakeQuantize) and module.dtype == torch.quint8:
                module.enable_observer(enabled)

    def activation_ranges(self) -> list[tuple[float, int]]:
        """(scale, zero point) of each quantized activation, in graph order (how onnxruntime's QDQ nodes follow)."""
        return [(float(q.scale), int(q.zero_point)) for q in self.executed]

    def remove(self) -> BirdNet:
        """The model without quantizers: tuned float weights, BatchNorm folded."""
        for hook in self.hooks:
            hook.remove()
        for module in list(self.model.modules()):
            if hasattr(module, "output_quantizer"):
                del module.output_quantizer
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        return self.model


def ambiguous_batch(pixels: torch.Tensor, generator: torch.Generator, mixup_fraction: float) -> torch.Tensor:
    """Normalised pixels made harder to call: random crop-and-zoom with flips, blur or noise, and mixup of part
    of the batch (the images the fp32 and int8 models disagree on are the low-margin ones)."""
    n = len(pixels)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    scale = 0.6 + 0.4 * uniform(n)
    flip = torch.where(uniform(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = (uniform(n, 2) * 2 - 1) * (1 - scale).unsqueeze(1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    blurred = F.avg_pool2d(out, 3, stride=1, padding=1, count_include_pad=False)
    kind = uniform(n).view(n, 1, 1, 1)
    out = torch.where(kind < 0.25, blurred, out)
    noise = torch.randn(out.shape, generator=generator) * 0.1
    out = torch.where(kind > 0.75, out + noise, out)
    mixed = int(n * mixup_fraction)
    if mixed:
        weight = 0.3 + 0.4 * uniform(mixed).view(mixed, 1, 1, 1)
        partner = torch.randperm(n, generator=generator)[:mixed]
        out[:mixed] = weight * out[:mixed] + (1 - weight) * out[partner]
    return out


@dataclass
class Tuned:
    """The tuned float model (BatchNorm folded) and the activation ranges it was tuned with, in graph order."""

    model: BirdNet
    activation_ranges: list[tuple[float, int]]


def tune_for_int8(model: BirdNet, images: np.ndarray, steps: int, lr: float = 2e-5, seed: int = 0) -> Tuned:
    """Tune a copy of ``model`` (left untouched) so that its int8 version follows ``model``; ``images``: uint8
    N x 64 x 64 x 3 from the run's training split. Deterministic for a given seed and thread count."""
    generator = torch.Generator().manual_seed(seed)
    teacher = model.eval()
    student = copy.deepcopy(model).eval()  # eval: BatchNorm is a fixed bias now, and no dropout
    fold_batchnorm(student)
    quantized = FakeQuantized(student)
    for name, parameter in student.named_parameters():
        # BatchNorm scales stay 1: the exporter folds them into the convolution after quantization is simulated
        parameter.requires_grad_(not (name.endswith(".weight") and parameter.ndim == 1 and "classifier" not in name))
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    for step in progress_bar(range(steps), desc="int8 tuning", unit="step"):
        quantized.observe(step < max(steps // 4, 1))  # ranges settle first, then stay what onnxruntime will use
        rows = np.sort(torch.randint(0, len(images), (BATCH,), generator=generator).numpy())
        with torch.no_grad():
            pixels = ambiguous_batch(teacher.preprocess(to_nchw(images[rows])), generator, MIXUP_FRACTION)
            target = teacher.classify_pixels(pixels).log_softmax(-1)
        logits = student.classify_pixels(pixels).log_softmax(-1)
        loss = F.kl_div(logits, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    ranges = quantized.activation_ranges()
    return Tuned(quantized.remove(), ranges)


def quantized_activations(model: onnx.ModelProto) -> list[str]:
    """Names of the activations a QDQ model quantizes, in graph order (weights are initializers)."""
    weights = {tensor.name for tensor in model.graph.initializer}
    return [
        node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in weights
    ]


def quantize_with_ranges(
    model: onnx.ModelProto, out: Path, images: np.ndarray, ranges: list[tuple[float, int]] | None
) -> None:
    """The export's int8 quantization (NHWC input); with ``ranges`` ((scale, zero point) per quantized activation
    in graph order: what the tuning simulated) forced instead of calibrated. A first pass names the tensors
    onnxruntime quantizes; the second sets their ranges (calibrating on one image only: every range is overridden)."""
    quantize_int8(model, out, images, "nhwc")
    if ranges is None:
        return
    names = quantized_activations(onnx.load(str(out)))
    if len(names) != len(ranges):
        raise RuntimeError(f"onnxruntime quantizes {len(names)} activations, tuning simulated {len(ranges)}")
    overrides = {
        name: [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero_point, np.uint8)}]
        for name, (scale, zero_point) in zip(names, ranges)
    }
    quantize_int8(model, out, images[:1], "nhwc", overrides)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="trained run folder (its training images tune and calibrate)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="test folder (test.csv; test_public_labels.csv when present)"
    )
    parser.add_argument("--steps", type=int, default=400, help="tuning steps (batches of 32)")
    parser.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate")
    parser.add_argument(
        "--tuned-ranges",
        action="store_true",
        help="quantize with the simulated activation ranges instead of calibrating again",
    )
    add_record_args(parser)
    args = parser.parse_args()
    os.environ[RUNTIME_VARIABLE] = (
        "onnxruntime"  # the quantizers simulated are onnxruntime's (int8 files default to OpenVINO)
    )

    table = load_test_table(args.data)
    images = np.asarray(load_images(table.lr_paths, LR_SIZE))
    folder = Path(tempfile.mkdtemp(prefix="bench-int8-qat-"))
    with OtherLoad() as load:
        model, labels = load_run_model(args.run)
        started = time.perf_counter()
        tuned = tune_for_int8(model, training_images(args.run), args.steps, args.lr)
        tuning_s = time.perf_counter() - started
        reference = Classifier.load(export_onnx(args.run, folder / "fp32.onnx")).predict_arrays(images).argmax(1)
        path = folder / "int8.onnx"
        quantize_with_ranges(
            onnx_program([(tuned.model, None)], labels, "nhwc", "int8").model_proto,
            path,
            calibration_images(args.run),
            tuned.activation_ranges if args.tuned_ranges else None,
        )
        int8 = Classifier.load(path).predict_arrays(images).argmax(1)
    agreement = float((int8 == reference).mean())
    f1_text = ""
    labels_csv = args.data / "test_public_labels.csv"
    if labels_csv.is_file():
        truth = dict(pd.read_csv(labels_csv, dtype=str)[["id", "label"]].itertuples(index=False))
        rows = [i for i, image_id in enumerate(table.ids) if image_id in truth]
        f1 = {
            name: score([truth[table.ids[i]] for i in rows], [labels[k] for k in p[rows]])["macro_f1"]
            for name, p in (("fp32", reference), ("int8", int8))
        }
        f1_text = (
            f"; macro-F1 {f1['fp32']:.4f} -> {f1['int8']:.4f} ({f1['int8'] - f1['fp32']:+.4f}) on {len(rows)} labelled"
        )
    ranges = "tuned ranges" if args.tuned_ranges else "onnxruntime calibration"
    summary = (
        f"int8 after {args.steps} tuning steps (lr {args.lr:g}, {ranges}, {tuning_s:.0f} s): top-1 agreement with "
        f"the run's fp32 ONNX {agreement:.2%} on {len(images)} test images{f1_text}"
    )
    record(
        args,
        "int8 quantization-aware tuning (benchmarks/int8_qat.py)",
        describe_machine("cpu"),
        load,
        [f"Result: {summary}"],
    )
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
