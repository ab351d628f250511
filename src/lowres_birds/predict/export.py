"""ONNX export: a trained run as one self-contained file that takes raw uint8 64x64 RGB images.

The graph holds everything ``Classifier`` does after decoding: the 8-bit resize with the run's filter (PIL's
bicubic as torch's CPU kernel computes it, PIL's Lanczos or the sharp Robidoux cubic, written as two float64
``MatMul``s with rounding and clipping so every runtime gets the same pixels), the normalisation, the network
and the calibrated softmax (``model/calibration.py``: the run's temperature) with the unknown score. A consumer in any
language only has to hand it pixels.

Input ``images``: uint8, ``N x 64 x 64 x 3`` (layout ``nhwc``, how decoders return pixels) or
``N x 3 x 64 x 64`` (``nchw``); N is dynamic. Outputs ``probabilities``: float32 ``N x classes``, calibrated;
``unknown_score``: float32 ``N``, above the ``unknown_threshold`` metadata (calibrated runs only): not one of the
training species.
Metadata (``metadata_props``): ``labels`` (JSON list, output column order), ``input_size`` (the side the
network sees after the in-graph resize), ``upscale_filter``, ``layout``, ``image_size`` (64), ``source`` (the model),
``precision``, for an int8 file with its float fallback ``fallback_margin``, and for a calibrated run ``temperature``,
``unknown_score_kind`` and ``unknown_threshold``.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lowres_birds.config import LR_SIZE
from lowres_birds.errors import UserError
from lowres_birds.model.calibration import CalibratedHead
from lowres_birds.model.factory import load_run_model
from lowres_birds.predict.calibrate import load_head
from lowres_birds.run_dir import RunDir, atomic_write

LAYOUTS = ("nhwc", "nchw")
CALIBRATION_IMAGES = 256
# The int8 file's float fallback (see with_float_fallback): an image whose int8 top-2 probabilities are closer than
# the margin is run again by the float network. The margin is calibrated on the run's validation split: wide
# enough to keep FALLBACK_AGREEMENT of its fp32 labels, with headroom, never below the floor (a split with few or
# no disagreements). Every point of agreement above that costs float time on more images.
FALLBACK_AGREEMENT = 0.995
FALLBACK_HEADROOM = 1.25
FALLBACK_FLOOR = 0.05
OPSET = 18  # the first opset whose Resize has the antialias attribute (runs with the float resize export it)


def probability_model(model, layout: str, head: CalibratedHead | None = None):
    """BirdNet with the input layout chosen at export and ``head`` on top (what the ONNX file computes): calibrated
    probabilities and the unknown score (without a head: the plain softmax and its max-softmax score)."""
    head = head or CalibratedHead(1.0, "max_softmax", {})

    class ProbabilityModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.head = model, head

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if layout == "nhwc":
                images = images.permute(0, 3, 1, 2)
            if self.head.needs_features:
                return self.head(*self.model(images, return_features=True))
            return self.head(None, self.model(images))

    return ProbabilityModel().eval()


def example_input(layout: str, batch: int = 2):
    """A uint8 batch in the exported layout (batch 2 so the exporter keeps N symbolic)."""
    shape = (batch, LR_SIZE, LR_SIZE, 3) if layout == "nhwc" else (batch, 3, LR_SIZE, LR_SIZE)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def export_onnx(
    run_dir: Path, out: Path, layout: str = "nhwc", int8: bool = False, fallback_margin: float | None = None
) -> Path:
    """Write ``out`` (one .onnx file, weights inside) for the run's best weights; returns ``out``.

    ``int8``: static int8 quantization of the network (see :func:`quantize_int8`); the resize, normalisation and
    softmax stay in float. Images the int8 network finds close calls (top-2 probabilities within
    ``fallback_margin``; None: calibrated on the run's validation split, :func:`calibrated_margin`) are run again
    by the float network inside the same file (:func:`with_float_fallback`); 0: int8 alone.
    """
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if out.suffix != ".onnx":
        raise UserError(f"--out {out} must end in .onnx (predict --onnx and Classifier.load recognise the suffix)")
    model, labels = load_run_model(run_dir)
    remedy = f"calibrate it first: lowres-birds calibrate --run {run_dir}"
    head, threshold, _ = load_head(run_dir, model, labels, remedy)
    program = onnx_program(model, labels, layout, "int8" if int8 else "fp32", head, threshold)
    if not int8:
        return atomic_write(out, lambda temporary: program.save(str(temporary), external_data=False))
    calibration = calibration_images(run_dir)

    def write(temporary: Path) -> None:
        quantize_int8(program.model_proto, temporary, calibration, layout)
        if fallback_margin == 0:
            return
        quantized = onnx.load(str(temporary))
        margin = (
            fallback_margin
            if fallback_margin is not None
            else calibrated_margin(program.model_proto, quantized, validation_images(run_dir), layout)
        )
        onnx.save(with_float_fallback(quantized, program.model_proto, margin), str(temporary))

    return atomic_write(out, write)


def onnx_program(
    model,
    labels: list[str],
    layout: str,
    precision: str = "fp32",
    head: CalibratedHead | None = None,
    unknown_threshold: float | None = None,
) -> torch.onnx.ONNXProgram:
    """The exported float graph of ``model`` (uint8 pixels in, calibrated probabilities and unknown scores out) with
    its metadata; a model object rather than a run, so a modified network (benchmarks/int8_qat.py) exports the same
    way."""
    if hasattr(model.backbone, "set_attn_implementation"):  # Hugging Face models
        # The exporter cannot decompose SDPA attention's output reshape with a dynamic batch; eager attention
        # computes the same thing and exports.
        model.backbone.set_attn_implementation("eager")
    wrapper = probability_model(model, layout, head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; real failures raise
        program = torch.onnx.export(
            wrapper,
            (example_input(layout),),
            input_names=["images"],
            output_names=["probabilities", "unknown_score"],
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
            "upscale_filter": model.spec.upscale_filter,
            "image_size": str(LR_SIZE),
            "layout": layout,
            "source": model.spec.source,
            "precision": precision,
        }
    )
    if unknown_threshold is not None:
        program.model.metadata_props.update(
            {
                "temperature": repr(float(head.temperature)),
                "unknown_score_kind": head.score,
                "unknown_threshold": repr(unknown_threshold),
            }
        )
    return program


def training_images(run_dir: Path, count: int | None = None, validation: bool = False) -> np.ndarray:
    """uint8 N x 64 x 64 x 3: the run's own training images (its data minus split.json's validation ids), or a
    random ``count`` of them (only those are read from the image cache); ``validation``: the validation images."""
    from lowres_birds.data.splits import run_split

    split = run_split(RunDir(run_dir))
    rows = split.val_rows if validation else split.train_rows
    if count is not None:
        rows = np.sort(np.random.default_rng(0).permutation(rows)[:count])
    return split.lr_images(rows)


def calibration_images(run_dir: Path, count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The int8 calibration set: ``count`` of the run's training images, the same ones on every export."""
    return training_images(run_dir, count)


def validation_images(run_dir: Path) -> np.ndarray:
    """uint8 N x 64 x 64 x 3: the run's validation split (images it was not trained on), for the fallback margin."""
    return training_images(run_dir, validation=True)


def quantize_int8(
    model: onnx.ModelProto,
    out: Path,
    images: np.ndarray,
    layout: str,
    tensor_overrides: dict | None = None,
) -> None:
    """Static int8 quantization with onnxruntime's quantizer (QDQ, which it fuses into integer kernels):
    per-channel int8 weights, uint8 activations calibrated on ``images`` (99.999th percentile ranges);
    ``tensor_overrides``: onnxruntime's TensorQuantOverrides, tensor name -> fixed ranges instead of calibrated ones.

    Kept in float: the in-graph resize and normalisation (exact integer arithmetic already), the first
    convolution, the classifier and the softmax (probabilities in steps of 1/256 would not sum to one). On cub100-lr
    with the cpu recipe, quantizing those two as well cost
    0.009 macro-F1; without them the int8 model scores within 0.005 of fp32 (BENCHMARKS.md).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, images: np.ndarray):
            pixels = images if layout == "nhwc" else images.transpose(0, 3, 1, 2)
            self.batches = iter(np.ascontiguousarray(pixels[start : start + 32]) for start in range(0, len(pixels), 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory(prefix="lowres-birds-int8-") as work:
        fp32, prepared = Path(work) / "fp32.onnx", Path(work) / "prepared.onnx"
        onnx.save(model, str(fp32))
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        nodes = list(onnx.load(str(prepared)).graph.node)
        first_conv = next(i for i, node in enumerate(nodes) if node.op_type == "Conv")
        kept_float = [node.name for node in nodes[: first_conv + 1]] + [
            node.name for node in nodes if node.op_type in ("Gemm", "MatMul", "Softmax")
        ]

        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress
            quantize_static(
                str(prepared),
                str(out),
                Batches(images),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=kept_float,
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": 99.999, "TensorQuantOverrides": tensor_overrides or {}},
            )
    quantized = onnx.load(str(out))
    set_metadata(quantized, {p.key: p.value for p in model.metadata_props})
    onnx.save(quantized, str(out))


def file_metadata(path: Path) -> dict[str, str]:
    """An exported file's ``metadata_props`` (weights not loaded)."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Add or replace ``metadata_props`` entries (a key twice makes the file invalid for onnx's checker)."""
    merged = {p.key: p.value for p in model.metadata_props} | values
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.StringStringEntryProto(key=key, value=value) for key, value in merged.items())


def top2_gap(probs: np.ndarray) -> np.ndarray:
    """Per row, the highest probability minus the second: how close a call is."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def calibrated_margin(fp32: onnx.ModelProto, int8: onnx.ModelProto, images: np.ndarray, layout: str) -> float:
    """The fallback margin: FALLBACK_HEADROOM times the int8 top-2 gap below which the disagreements of int8 and fp32
    on ``images`` must be caught to keep FALLBACK_AGREEMENT of their labels (the widest few may stay), at least
    FALLBACK_FLOOR. Near ties are where 8-bit rounding flips labels (BENCHMARKS.md)."""
    import onnxruntime as ort

    if not len(images):
        return FALLBACK_FLOOR
    pixels = images if layout == "nhwc" else images.transpose(0, 3, 1, 2)
    probs = []
    for model in (fp32, int8):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        probs.append(
            np.concatenate(
                [
                    session.run(None, {"images": np.ascontiguousarray(pixels[i : i + 64])})[0]
                    for i in range(0, len(pixels), 64)
                ]
            )
        )
    gaps = np.sort(top2_gap(probs[1])[probs[0].argmax(1) != probs[1].argmax(1)])
    tolerated = int((1 - FALLBACK_AGREEMENT) * len(images))
    caught = gaps[: max(len(gaps) - tolerated, 0)]
    return max(FALLBACK_FLOOR, FALLBACK_HEADROOM * float(caught.max())) if len(caught) else FALLBACK_FLOOR


def with_float_fallback(int8: onnx.ModelProto, fp32: onnx.ModelProto, margin: float) -> onnx.ModelProto:
    """One graph: the int8 network for every image, then, only when some image's top-2 probabilities are within
    ``margin``, the float network on those images (an ``If`` on the batch, a ``Gather`` of the rows), whose
    probabilities replace the int8 ones (``ScatterND``). Costs the float network's time on the close calls only."""
    from onnx import compose

    fallback = compose.add_prefix(fp32, "fp32/").graph
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    graph = model.graph
    images, output = graph.input[0].name, graph.output[0].name
    quick = f"int8/{output}"
    for node in graph.node:
        node.output[:] = [quick if name == output else name for name in node.output]

    def constant(name: str, value, dtype=np.int64) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), f"fallback/{name}"))
        return f"fallback/{name}"

    # also the axes of Slice, Squeeze
    zero, one, two = (
        constant("zero", [0]),
        constant("one", [1]),
        constant("two", [2]),
    )
    limit, none = constant("margin", margin, np.float32), constant("none", 0.0, np.float32)
    node = onnx.helper.make_node
    graph.node.extend(
        [
            node("TopK", [quick, two], ["fallback/top2", "fallback/top2_index"], axis=1),
            node("Slice", ["fallback/top2", zero, one, one], ["fallback/first"]),
            node("Slice", ["fallback/top2", one, two, one], ["fallback/second"]),
            node("Sub", ["fallback/first", "fallback/second"], ["fallback/gap"]),
            node("Less", ["fallback/gap", limit], ["fallback/close_n1"]),
            node("Squeeze", ["fallback/close_n1", one], ["fallback/close"]),
            node("NonZero", ["fallback/close"], ["fallback/rows_1m"]),
            node("Cast", ["fallback/close"], ["fallback/close_float"], to=onnx.TensorProto.FLOAT),
            node("ReduceSum", ["fallback/close_float"], ["fallback/count"], keepdims=0),
            node("Greater", ["fallback/count", none], ["fallback/any"]),
        ]
    )
    classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value

    def result(name: str) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", classes])

    rerun = onnx.helper.make_graph(
        [
            node("Squeeze", ["fallback/rows_1m", zero], ["fallback/rows"]),
            node("Unsqueeze", ["fallback/rows", one], ["fallback/rows_m1"]),
            node("Gather", [images, "fallback/rows"], [fallback.input[0].name], axis=0),
            *fallback.node,
            node("ScatterND", [quick, "fallback/rows_m1", fallback.output[0].name], ["fallback/replaced"]),
        ],
        "float_fallback",
        [],
        [result("fallback/replaced")],
        initializer=list(fallback.initializer),
    )
    keep = onnx.helper.make_graph(
        [node("Identity", [quick], ["fallback/kept"])], "int8_only", [], [result("fallback/kept")]
    )
    graph.node.append(node("If", ["fallback/any"], [output], then_branch=rerun, else_branch=keep))
    set_metadata(model, {"fallback_margin": f"{margin:.4f}"})
    return model
