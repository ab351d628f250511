"""ONNX export: a trained run, or a whole ensemble, as one self-contained file that takes raw uint8 64x64 RGB images.

The graph holds everything ``Classifier`` does after decoding: the 8-bit resize with the run's filter (PIL's
bicubic as torch's CPU kernel computes it, PIL's Lanczos or the sharp Robidoux cubic, written as two float64
``MatMul``s with rounding and clipping so every runtime gets the same pixels), the normalisation, the network
and the calibrated softmax (``model/calibration.py``: the run's temperature) with the unknown score. An ensemble or
folds folder puts every run in the file, each with its own resize, combined as ``Classifier.combine`` does; flip TTA
(``--tta flip``, or what the folder records) averages each image with its mirror inside the graph. A consumer in any
language only has to hand it pixels.

Input ``images``: uint8, ``N x 64 x 64 x 3`` (layout ``nhwc``, how decoders return pixels) or
``N x 3 x 64 x 64`` (``nchw``); N is dynamic. Outputs ``probabilities``: float32 ``N x classes``, calibrated;
``unknown_score``: float32 ``N``, above the ``unknown_threshold`` metadata (calibrated runs only): not one of the
training species.
Metadata (``metadata_props``): ``labels`` (JSON list, output column order), ``input_size`` (the side the
network sees after the in-graph resize; an ensemble's largest), ``upscale_filter``, ``layout``, ``image_size`` (64),
``source`` (the model), ``precision``, ``tta`` (none or flip: inside the graph), for an ensemble ``members`` (JSON:
each run's source, input size, filter and weight), for an int8 file with its float fallback ``fallback_margin``, and
for a calibrated run ``temperature``, ``unknown_score_kind`` and ``unknown_threshold``.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lowres_birds.config import LR_SIZE
from lowres_birds.data.splits import run_split
from lowres_birds.errors import UserError
from lowres_birds.model.calibration import CalibratedHead
from lowres_birds.model.ensemble import combine_outputs, combined_calibration, member_shares
from lowres_birds.model.factory import load_run_model
from lowres_birds.model.wrapper import BirdNet
from lowres_birds.predict.calibrate import load_head
from lowres_birds.run_dir import RunDir, atomic_write, recorded_prediction

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike

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


def network_graph(
    parts: list[tuple[BirdNet, CalibratedHead | None]],
    layout: str,
    weights: list[float] | None = None,
    tta: str = "none",
) -> torch.nn.Module:
    """What the ONNX file computes, as a torch module: uint8 pixels in the layout chosen at export -> calibrated
    probabilities and the unknown score of each network (with its head; without one: the plain softmax and its
    max-softmax score), several combined as ``Classifier.combine`` does (``model/ensemble.py``'s
    ``combine_outputs``, ``weights`` None: a plain mean), averaged with the mirror image when ``tta`` is flip (as
    ``Classifier.predict_scores`` does)."""
    heads = [head or CalibratedHead(1.0, "max_softmax", {}) for _, head in parts]
    shares = member_shares(weights, len(parts))

    class Network(torch.nn.Module):
        def __init__(self, model: BirdNet, head: CalibratedHead):
            super().__init__()
            self.model, self.head = model, head

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.head.needs_features:
                return self.head(*self.model(images, return_features=True))
            return self.head(None, self.model(images))

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.networks = torch.nn.ModuleList([Network(model, head) for (model, _), head in zip(parts, heads)])
            self.register_buffer("weights", torch.tensor(shares, dtype=torch.float32))
            self.register_buffer("temperatures", torch.tensor([h.temperature for h in heads], dtype=torch.float32))

        def once(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = [network(images) for network in self.networks]
            return outputs[0] if len(outputs) == 1 else combine_outputs(outputs, self.weights, self.temperatures)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if layout == "nhwc":
                images = images.permute(0, 3, 1, 2)
            probs, unknown = self.once(images)
            if tta == "flip":
                mirrored_probs, mirrored_unknown = self.once(images.flip(-1))
                probs, unknown = (probs + mirrored_probs) / 2, (unknown + mirrored_unknown) / 2
            return probs, unknown

    return Graph().eval()


def example_input(layout: str, batch: int = 2) -> torch.Tensor:
    """A uint8 batch in the exported layout (batch 2 so the exporter keeps N symbolic)."""
    shape = (batch, LR_SIZE, LR_SIZE, 3) if layout == "nhwc" else (batch, 3, LR_SIZE, LR_SIZE)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def export_onnx(
    run_dir: Path,
    out: Path,
    layout: str = "nhwc",
    int8: bool = False,
    fallback_margin: float | None = None,
    tta: str | None = None,
    data_dir: Path | None = None,
) -> Path:
    """Write ``out`` (one .onnx file, weights inside) for the run's kept weights, or every run of an ensemble or folds
    folder (weighted as the folder records); returns ``out``. ``tta``: flip puts the mirror average inside the graph
    (None: what the folder records, else none), recorded in the file.

    ``int8``: static int8 quantization of the networks (see :func:`quantize_int8`); the resize, normalisation and
    softmax stay in float. Images the int8 graph finds close calls (top-2 probabilities within
    ``fallback_margin``; None: calibrated on the (first) run's validation split, :func:`calibrated_margin`) are run
    again by the float graph inside the same file (:func:`with_float_fallback`); 0: int8 alone. Both read the
    run's images from ``data_dir`` (None: the folder it was trained on).
    """
    from lowres_birds.predict.classifier import resolve_ensemble

    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if out.suffix != ".onnx":
        raise UserError(f"--out {out} must end in .onnx (predict --onnx and Classifier.load recognise the suffix)")
    runs, weights = resolve_ensemble([run_dir])
    tta = tta or recorded_prediction([run_dir])["tta"]
    parts, thresholds, labels = [], [], None
    for run in runs:
        model, run_labels = load_run_model(run)
        if labels is not None and run_labels != labels:
            raise UserError(f"{run} was trained on other classes than {runs[0]}; an ensemble must share its classes")
        labels = run_labels
        head, threshold, _ = load_head(run, model, labels, f"calibrate it first: lowres-birds calibrate --run {run}")
        parts.append((model, head))
        thresholds.append(threshold)
    shares = member_shares(weights, len(parts))
    _, threshold = combined_calibration(shares, [head.temperature for _, head in parts], thresholds)
    program = onnx_program(parts, labels, layout, "int8" if int8 else "fp32", threshold, weights, tta, str(run_dir))
    if not int8:
        return atomic_write(out, lambda temporary: program.save(str(temporary), external_data=False))
    calibration = calibration_images(runs[0], data_dir)

    def write(temporary: Path) -> None:
        quantize_int8(program.model_proto, temporary, calibration, layout)
        if fallback_margin == 0:
            return
        quantized = onnx.load(str(temporary))
        margin = (
            fallback_margin
            if fallback_margin is not None
            else calibrated_margin(program.model_proto, quantized, held_out_images(runs[0], data_dir), layout)
        )
        onnx.save(with_float_fallback(quantized, program.model_proto, margin), str(temporary))

    return atomic_write(out, write)


def onnx_program(
    parts: list[tuple[BirdNet, CalibratedHead | None]],
    labels: list[str],
    layout: str,
    precision: str = "fp32",
    unknown_threshold: float | None = None,
    weights: list[float] | None = None,
    tta: str = "none",
    source: str | None = None,
) -> torch.onnx.ONNXProgram:
    """The exported float graph of :func:`network_graph` (uint8 pixels in, calibrated probabilities and unknown
    scores out) with its metadata; model objects rather than runs, so a modified network (benchmarks/int8_qat.py)
    exports the same way."""
    for model, _ in parts:
        if hasattr(model.backbone, "set_attn_implementation"):  # Hugging Face models
            # The exporter cannot decompose SDPA attention's output reshape with a dynamic batch; eager attention
            # computes the same thing and exports.
            model.backbone.set_attn_implementation("eager")
    graph = network_graph(parts, layout, weights, tta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; real failures raise
        program = torch.onnx.export(
            graph,
            (example_input(layout),),
            input_names=["images"],
            output_names=["probabilities", "unknown_score"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    specs = [model.spec for model, _ in parts]
    program.model.metadata_props.update(
        {
            "labels": json.dumps(labels, ensure_ascii=False),
            "input_size": str(max(spec.input_size for spec in specs)),
            "upscale_filter": "+".join(dict.fromkeys(spec.upscale_filter for spec in specs)),
            "image_size": str(LR_SIZE),
            "layout": layout,
            "source": source or " + ".join(spec.source for spec in specs),
            "precision": precision,
            "tta": tta,
        }
    )
    shares = member_shares(weights, len(parts))
    if len(parts) > 1:
        members = [
            {"source": spec.source, "input_size": spec.input_size, "upscale_filter": spec.upscale_filter, "weight": w}
            for spec, w in zip(specs, shares)
        ]
        program.model.metadata_props["members"] = json.dumps(members)
    if unknown_threshold is not None:
        heads = [head for _, head in parts]
        temperature, _ = combined_calibration(shares, [h.temperature for h in heads], [unknown_threshold] * len(heads))
        program.model.metadata_props.update(
            {
                "temperature": repr(temperature),
                "unknown_score_kind": "+".join(dict.fromkeys(h.score for h in heads)),
                "unknown_threshold": repr(unknown_threshold),
            }
        )
    return program


def training_images(run_dir: Path, data_dir: Path | None = None, count: int | None = None) -> np.ndarray:
    """uint8 N x 64 x 64 x 3: the run's own training images (its data, ``data_dir`` or the folder it was trained on,
    minus split.json's validation ids), or a random ``count`` of them (only those are read from the image cache)."""
    split = run_split(RunDir(run_dir), data_dir)
    rows = split.train_rows
    if count is not None:
        rows = np.sort(np.random.default_rng(0).permutation(rows)[:count])
    return split.lr_images(rows)


def calibration_images(run_dir: Path, data_dir: Path | None = None, count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The int8 calibration set: ``count`` of the run's training images, the same ones on every export."""
    return training_images(run_dir, data_dir, count)


def held_out_images(run_dir: Path, data_dir: Path | None = None) -> np.ndarray:
    """uint8 N x 64 x 64 x 3: the run's validation split (images it was not trained on), for the fallback margin."""
    split = run_split(RunDir(run_dir), data_dir)
    return split.lr_images(split.val_rows)


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

    Kept in float: the in-graph resize and normalisation (exact integer arithmetic already), the first convolution
    (of every network), the classifiers and the softmax (probabilities in steps of 1/256 would not sum to one). On
    cub100-lr with the cpu recipe, quantizing the first convolution and the classifier as well cost 0.009 macro-F1;
    without them the int8 model scores within 0.005 of fp32 (BENCHMARKS.md).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        create_calibrator,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batch(CalibrationDataReader):
        def __init__(self, pixels: np.ndarray):
            self.batches = iter([np.ascontiguousarray(pixels)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory(prefix="lowres-birds-int8-") as work:
        fp32, prepared = Path(work) / "fp32.onnx", Path(work) / "prepared.onnx"
        onnx.save(model, str(fp32))
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        nodes = list(onnx.load(str(prepared)).graph.node)
        kept_float = [node.name for node in before_and_first_convolutions(nodes)] + [
            node.name for node in nodes if node.op_type in ("Gemm", "MatMul", "Softmax")
        ]
        # The ranges, one batch at a time (onnxruntime's calibrator keeps every batch's activations until the end:
        # 24 GB and more for an ensemble of three networks with flip TTA), into the cache quantize_static reads.
        calibrator = create_calibrator(
            prepared,
            sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # quantize_static's default op types
            augmented_model_path=str(Path(work) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"percentile": 99.999},
        )
        pixels = images if layout == "nhwc" else images.transpose(0, 3, 1, 2)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress
            for start in range(0, len(pixels), 32):
                calibrator.collect_data(Batch(pixels[start : start + 32]))
                calibrator.intermediate_outputs.clear()
            ranges = Path(work) / "ranges.json"
            save_tensors_data(calibrator.compute_data(), ranges)
            del calibrator
            quantize_static(
                str(prepared),
                str(out),
                None,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=kept_float,
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"TensorQuantOverrides": tensor_overrides or {}},
                calibration_cache_path=ranges,
            )
    quantized = onnx.load(str(out))
    set_metadata(quantized, {p.key: p.value for p in model.metadata_props})
    onnx.save(quantized, str(out))


def before_and_first_convolutions(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes (in graph order) that no convolution feeds: each network's resize and normalisation, and the first
    convolution of each network (of an ensemble's every member)."""
    after_conv: set[str] = set()
    kept = []
    for node in nodes:
        fed = any(name in after_conv for name in node.input)
        if node.op_type == "Conv" or fed:
            after_conv.update(node.output)
        if not fed:
            kept.append(node)
    return kept


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

    def constant(name: str, value: ArrayLike, dtype: DTypeLike = np.int64) -> str:
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
