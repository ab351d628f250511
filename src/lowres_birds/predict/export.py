"""ONNX export: a trained run as one self-contained file that takes raw uint8 64x64 RGB images.

The graph holds everything ``Classifier`` does after decoding: the 8-bit bicubic resize (PIL's, as torch's CPU
kernel computes it, written as two float64 ``MatMul``s with rounding and clipping so every runtime gets the same
pixels), the normalisation, the network and a softmax. A consumer in any language only has to hand it pixels.

Input ``images``: uint8, ``N x 64 x 64 x 3`` (layout ``nhwc``, how decoders return pixels) or
``N x 3 x 64 x 64`` (``nchw``); N is dynamic. Output ``probabilities``: float32 ``N x classes``.
Metadata (``metadata_props``): ``labels`` (JSON list, output column order), ``input_size`` (the side the
network sees after the in-graph resize), ``layout``, ``image_size`` (64) and ``source`` (the model).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from lowres_birds.config import LR_SIZE
from lowres_birds.errors import UserError
from lowres_birds.model.factory import load_run_model
from lowres_birds.run_dir import atomic_write

LAYOUTS = ("nhwc", "nchw")
OPSET = 18  # the first opset whose Resize has the antialias attribute (runs with the float resize export it)


def probability_model(model, layout: str):
    """BirdNet with the input layout chosen at export and a softmax on top (what the ONNX file computes)."""
    class ProbabilityModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if layout == "nhwc":
                images = images.permute(0, 3, 1, 2)
            return self.model(images).float().softmax(-1)

    return ProbabilityModel().eval()


def example_input(layout: str, batch: int = 2):
    """A uint8 batch in the exported layout (batch 2 so the exporter keeps N symbolic)."""
    shape = (batch, LR_SIZE, LR_SIZE, 3) if layout == "nhwc" else (batch, 3, LR_SIZE, LR_SIZE)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def export_onnx(run_dir: Path, out: Path, layout: str = "nhwc") -> Path:
    """Write ``out`` (one .onnx file, weights inside) for the run's best weights; returns ``out``."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if out.suffix != ".onnx":
        raise UserError(f"--out {out} must end in .onnx (predict --onnx and Classifier.load recognise the suffix)")
    model, labels = load_run_model(run_dir)
    if hasattr(model.backbone, "set_attn_implementation"):  # Hugging Face models
        # The exporter cannot decompose SDPA attention's output reshape with a dynamic batch; eager attention
        # computes the same thing and exports.
        model.backbone.set_attn_implementation("eager")
    wrapper = probability_model(model, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; real failures raise
        program = torch.onnx.export(
            wrapper,
            (example_input(layout),),
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.model.metadata_props.update(
        {
            "labels": json.dumps(labels, ensure_ascii=False),
            "input_size": str(model.spec.input_size),
            "image_size": str(LR_SIZE),
            "layout": layout,
            "source": model.spec.source,
        }
    )
    return atomic_write(out, lambda temporary: program.save(str(temporary), external_data=False))
