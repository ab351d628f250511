"""Prediction: load a trained run (or an exported ONNX model or Hugging Face folder) and turn images into
probabilities.

``Classifier`` is the one code path the CLI, the server and the Python API share: any image is brought
to the run's low-res input (downscaled to 64x64 first when larger, as the training images were), then
the model wrapper resizes and normalises exactly as in training. Called like a Hugging Face pipeline::

    classify = Classifier.load("runs/train")          # a run folder, model.onnx or an exported HF folder
    classify("photo.jpg", top_k=3)                    # [{"label": ..., "score": ...}, ...] best first
    classify(["a.jpg", pil_image, array])             # one such list per image
    probs, unknown = classify.predict_scores(arrays)  # calibrated probabilities and the unknown score
    classify.is_unknown(unknown)                      # True: not one of the training species (None: not calibrated)

Scores are calibrated (the run's temperature, ``lowres-birds calibrate``) and every answer carries an unknown score
(``predict/calibrate.py``); a run calibrated before this existed answers with temperature 1 and no unknown flag.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from lowres_birds.config import ENSEMBLE_MODES, LR_SIZE, TTA_MODES
from lowres_birds.data.images import decode_image, fit_square, load_images, to_rgb_array
from lowres_birds.data.tables import load_test_table
from lowres_birds.errors import UserError
from lowres_birds.extras import missing as missing_extra
from lowres_birds.extras import require as require_extra
from lowres_birds.model.calibration import CalibratedHead
from lowres_birds.model.ensemble import combine_outputs, combined_calibration, f1_weights, member_shares
from lowres_birds.model.factory import load_run_model
from lowres_birds.model.wrapper import in_batches
from lowres_birds.predict.calibrate import load_head
from lowres_birds.predict.hf_folder import is_hf_folder, load_hf_folder
from lowres_birds.run_dir import FoldsDir, MembersDir, check_labels, model_folders, recorded_prediction

if TYPE_CHECKING:
    import pandas as pd

    from lowres_birds.model.wrapper import BirdNet

    # one image as Classifier and to_model_input take it: a file path, a PIL image or a uint8 array (numpy or torch)
    ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor

ONNX_RUNTIMES = ("onnxruntime", "openvino")
RUNTIME_VARIABLE = "LOWRES_BIRDS_ONNX_RUNTIME"
THREADS_VARIABLE = "LOWRES_BIRDS_THREADS"  # threads of an ONNX session (default: every core)


def onnx_threads() -> int:
    """$LOWRES_BIRDS_THREADS (a whole number of at least 1), else every core."""
    text = os.environ.get(THREADS_VARIABLE, "").strip()
    if not text:
        return os.cpu_count() or 1
    if not text.isdigit() or int(text) < 1:
        raise UserError(
            f"{THREADS_VARIABLE}={text!r} is not a number of threads: use a whole number of at least 1, or unset it"
        )
    return int(text)


def onnx_runtime(precision: str) -> str:
    """Which runtime runs an ONNX file: $LOWRES_BIRDS_ONNX_RUNTIME when set; else OpenVINO for int8 files where
    the [openvino] extra is installed (there it ran the int8 file 2.1x the fp32 one, onnxruntime 1.6x, in the same
    process, BENCHMARKS.md), onnxruntime for everything else (fp32: onnxruntime was as fast or faster)."""
    chosen = os.environ.get(RUNTIME_VARIABLE, "")
    if chosen:
        if chosen not in ONNX_RUNTIMES:
            raise UserError(
                f"{RUNTIME_VARIABLE}={chosen!r} is not a runtime: use one of {', '.join(ONNX_RUNTIMES)}, or unset it"
            )
        if chosen == "openvino":
            require_extra("openvino", f"{RUNTIME_VARIABLE}=openvino")
        return chosen
    return "openvino" if precision == "int8" and not missing_extra("openvino") else "onnxruntime"


class Classifier:
    """A trained model ready to predict: ``Classifier.load(source)(image, top_k=5)``."""

    def __init__(
        self,
        labels: list[str],
        predict_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | torch.Tensor],
        name: str,
        input_size: int,
        runtime: str = "torch",
        unknown_threshold: float | None = None,
        temperature: float = 1.0,
        tta: str = "none",
        flip_inside: bool = False,
    ):
        self.labels = labels
        # uint8 N x 3 x 64 x 64 tensor -> (calibrated probabilities N x C, unknown scores N), or probabilities alone
        self._predict_fn = predict_fn
        self.name = name
        self.input_size = input_size
        self.runtime = runtime  # what computes the network: torch, onnxruntime or openvino
        self.unknown_threshold = unknown_threshold  # None: not calibrated, no unknown flag
        self.temperature = temperature  # the scores are softmax(logits / temperature); 1: not calibrated
        self.tta = tta  # what predictions apply unless told otherwise: the model's own (an ensemble folder records it)
        self.flip_inside = flip_inside  # predict_fn averages each image with its mirror already (an ONNX file's graph)

    @classmethod
    def load(
        cls, source: str | Path, device: str = "cpu", shares_cpu: bool = False, tta: str | None = None
    ) -> Classifier:
        """A run folder (``train``), an ensemble or folds folder (its runs as one model, weighted and with the TTA its
        ``ensemble.json`` records), an ONNX file or a Hugging Face folder (``export --format hf``), checked with one
        prediction before it is handed out. ``tta``: what it applies unless told otherwise (None: the model's own).

        ``shares_cpu``: other busy threads share the cores (the server's decoders), so onnxruntime's threads wait
        passively instead of spinning between calls."""
        source = Path(source)
        if tta is not None and tta not in TTA_MODES:
            raise UserError(f"unknown test-time augmentation {tta!r}: use one of {', '.join(TTA_MODES)}")
        if source.suffix == ".onnx":
            classifier = cls._load_onnx(source, shares_cpu)
        elif MembersDir(source).is_group() or FoldsDir(source).is_group():
            members, weights = resolve_ensemble([source])
            classifier = cls.combine([cls.load(member, device) for member in members], weights, str(source))
            classifier.tta = recorded_prediction([source])["tta"]
        else:
            hf = is_hf_folder(source)
            model, labels = load_hf_folder(source, device) if hf else load_run_model(source, device)
            remedy = (
                "export it again from a calibrated run (lowres-birds calibrate, then export)"
                if hf
                else f"add both with: lowres-birds calibrate --run {source}"
            )
            head = load_head(source, model, labels, remedy)
            classifier = cls._from_model(model, labels, str(source), device, *head)
        classifier.tta = tta or classifier.tta
        classifier.refuse_plain_answers(classifier.tta)
        classifier.check()
        return classifier

    @classmethod
    def combine(cls, classifiers: list[Classifier], weights: list[float] | None = None, name: str = "") -> Classifier:
        """Several classifiers of the same classes as one (``model/ensemble.py``'s ``combine_outputs``: the weighted
        mean of their plain probabilities at their weighted mean temperature, their unknown scores and thresholds
        weighted alike; flagging only when every one is calibrated); ``weights``: their shares, normalised to sum to 1
        (None: a plain mean)."""
        if len(classifiers) == 1:
            return classifiers[0]
        labels = classifiers[0].labels
        for classifier in classifiers[1:]:
            if classifier.labels != labels:
                raise UserError(
                    f"{classifier.name} was trained on different classes than {classifiers[0].name}; cannot average"
                )
        if weights is not None and (
            len(weights) != len(classifiers)
            or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
            or sum(weights) <= 0
        ):
            count = len(classifiers)
            raise UserError(
                f"weights {list(weights)!r}: give {count} non-negative numbers, one per classifier, not all 0"
            )
        shares = member_shares(weights and [w / sum(weights) for w in weights], len(classifiers))
        temperature, threshold = combined_calibration(
            shares, [c.temperature for c in classifiers], [c.unknown_threshold for c in classifiers]
        )
        share_tensor = torch.tensor(shares, dtype=torch.float32)
        temperatures = torch.tensor([c.temperature for c in classifiers], dtype=torch.float32)

        def predict_fn(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return combine_outputs([c.scores(images) for c in classifiers], share_tensor, temperatures)

        return cls(
            labels,
            predict_fn,
            name or " + ".join(c.name for c in classifiers),
            max(c.input_size for c in classifiers),
            "+".join(sorted({c.runtime for c in classifiers})),
            threshold,
            temperature,
        )

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 N x 3 x 64 x 64 -> (calibrated probabilities N x C, unknown scores N; zeros for a model without
        calibration), without TTA."""
        output = self._predict_fn(images)
        probs, unknown = output if isinstance(output, tuple) else (output, torch.zeros(len(images)))
        return torch.as_tensor(probs).float(), torch.as_tensor(unknown).float()

    def check(self) -> None:
        """Predict one blank image: a model that loads but cannot answer for its labels is refused now, not at
        its first request (an ONNX file with a ``labels`` key is not necessarily one of ours)."""
        try:
            probs, unknown = self.predict_scores(np.zeros((1, LR_SIZE, LR_SIZE, 3), np.uint8))
        except Exception as exc:  # noqa: BLE001 - a foreign model fails in runtime-specific ways
            detail = (str(exc).strip().splitlines() or [""])[0][:160]
            raise UserError(
                f"{self.name} cannot predict ({type(exc).__name__}: {detail}); it is not a lowres-birds model: "
                "re-export or retrain it"
            ) from None
        finite = np.isfinite(probs).all() and (unknown is None or np.isfinite(unknown).all())
        if probs.shape != (1, len(self.labels)) or not finite or abs(float(probs.sum()) - 1) > 1e-3:
            raise UserError(
                f"{self.name} answers one 64x64 image with an array of shape {tuple(probs.shape)} summing to "
                f"{float(probs.sum()):.4g}, "
                f"not probabilities over its {len(self.labels)} labels; it is not a lowres-birds model: re-export or "
                "retrain it"
            )

    @classmethod
    def _from_model(
        cls,
        model: BirdNet,
        labels: list[str],
        name: str,
        device: str,
        head: CalibratedHead,
        unknown_threshold: float | None,
        temperature: float,
    ) -> Classifier:
        head = head.to(device)

        def predict_fn(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            images = images.to(device)
            if head.needs_features:
                return head(*model(images, return_features=True))
            return head(None, model(images))

        return cls(labels, predict_fn, name, model.spec.input_size, "torch", unknown_threshold, temperature)

    @classmethod
    def _load_onnx(cls, path: Path, shares_cpu: bool) -> Classifier:
        require_extra("onnx", "an ONNX model")
        import onnx

        if not path.is_file():
            raise UserError(f"ONNX model {path} not found; create it with: lowres-birds export --run RUN --out {path}")
        try:
            metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as exc:  # noqa: BLE001 - protobuf's decode errors have no common public base
            raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None
        if "labels" not in metadata:
            raise UserError(f"{path} was not exported by lowres-birds (no label metadata); re-export it")
        try:
            labels, input_size = json.loads(metadata["labels"]), int(metadata.get("input_size", 0))
        except (json.JSONDecodeError, ValueError):
            labels, input_size = None, 0
        labels = check_labels(labels, f"{path}: its 'labels' metadata", "re-export it")
        threads = onnx_threads()
        runtime = onnx_runtime(metadata.get("precision", "fp32"))
        run = (
            _openvino_runner(path, threads) if runtime == "openvino" else _onnxruntime_runner(path, threads, shares_cpu)
        )
        channels_last = metadata.get("layout") == "nhwc"  # see export.py; predict_fn receives NCHW
        try:
            threshold = float(metadata["unknown_threshold"]) if "unknown_threshold" in metadata else None
            temperature = float(metadata.get("temperature", 1))
        except ValueError:
            threshold, temperature = math.nan, math.nan
        if not (math.isfinite(temperature) and temperature > 0 and math.isfinite(threshold or 0)):
            raise UserError(
                f"{path}: its 'temperature' metadata must be a number above 0 and its 'unknown_threshold' a finite "
                "number; re-export it"
            )

        def predict_fn(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pixels = images.permute(0, 2, 3, 1) if channels_last else images
            outputs = run(np.ascontiguousarray(pixels.numpy()))
            # a file exported before calibration has no unknown_score output
            unknown = outputs[1] if len(outputs) > 1 else np.zeros(len(outputs[0]), np.float32)
            return torch.from_numpy(outputs[0]), torch.from_numpy(unknown)

        tta = metadata.get("tta", "none")
        if tta not in TTA_MODES:
            raise UserError(f"{path}: its 'tta' metadata {tta!r} is not one of {', '.join(TTA_MODES)}; re-export it")
        return cls(labels, predict_fn, str(path), input_size, runtime, threshold, temperature, tta, tta == "flip")

    def predict_scores(
        self, images: np.ndarray, tta: str | None = None, batch_size: int = 64, progress: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 N x 64 x 64 x 3 (or N x 3 x 64 x 64) -> (calibrated probabilities N x C, unknown scores N, or None
        for a model without calibration), both flip-averaged with ``tta="flip"`` (None: the model's own, ``self.tta``).
        ``progress``: the description of a progress bar (shown on terminals)."""
        tta = self.tta if tta is None else tta
        if tta not in TTA_MODES:
            raise UserError(f"unknown test-time augmentation {tta!r}: use one of {', '.join(TTA_MODES)}")
        self.refuse_plain_answers(tta)
        flip = tta == "flip" and not self.flip_inside
        images = np.asarray(images)
        if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
            raise UserError(
                f"expected a batch of images N x H x W x 3 (or N x 3 x H x W), got shape {images.shape}; for one "
                "image pass images[None], or call the classifier on it"
            )
        if images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)
        images = uint8_pixels(images)

        def predict(batch: torch.Tensor) -> torch.Tensor:
            """N x (C + 1): the probabilities, then the unknown score."""
            return torch.cat([(parts := self.scores(batch))[0], parts[1][:, None]], 1)

        def scores(batch: torch.Tensor) -> torch.Tensor:
            both = predict(batch)
            return (both + predict(batch.flip(-1))) / 2 if flip else both

        both = in_batches(scores, images, batch_size, desc=progress)
        if not len(both):
            both = np.zeros((0, len(self.labels) + 1), np.float32)
        return both[:, :-1], (both[:, -1] if self.unknown_threshold is not None else None)

    def refuse_plain_answers(self, tta: str) -> None:
        """An ONNX file exported with --tta flip averages every image with its mirror inside its graph: it cannot
        answer without that average, so ``tta="none"`` is refused rather than ignored."""
        if tta == "none" and self.flip_inside:
            raise UserError(
                f"{self.name} averages each image with its mirror inside its graph (exported with --tta flip), so it "
                "cannot answer with --tta none; export the run again without --tta flip for plain answers"
            )

    def predict_arrays(
        self, images: np.ndarray, tta: str | None = None, batch_size: int = 64, progress: str | None = None
    ) -> np.ndarray:
        """uint8 N x 64 x 64 x 3 (or N x 3 x 64 x 64) -> calibrated probabilities N x C (see ``predict_scores``)."""
        return self.predict_scores(images, tta, batch_size, progress)[0]

    def is_unknown(self, unknown_scores: np.ndarray | None) -> np.ndarray | None:
        """True where an image is judged not one of the training species (score above the run's threshold, set on
        its validation split); None for a model without calibration."""
        if self.unknown_threshold is None or unknown_scores is None:
            return None
        return np.asarray(unknown_scores) > self.unknown_threshold

    def __call__(
        self, images: ImageInput | list[ImageInput] | tuple[ImageInput, ...], top_k: int = 5, tta: str | None = None
    ) -> list[dict] | list[list[dict]]:
        """Like a Hugging Face image-classification pipeline: one image (a path, a PIL image or an H x W x 3
        uint8 array) -> ``[{"label", "score"}, ...]``, the ``top_k`` best first; a list of images -> one such
        list per image."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise UserError(f"top_k must be a whole number of at least 1, got {top_k!r}")
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        arrays = (
            np.stack([to_model_input(image) for image in batch])
            if batch
            else np.zeros((0, LR_SIZE, LR_SIZE, 3), np.uint8)
        )
        answers = [
            [{"label": label, "score": score} for label, score in self.top_k(row, top_k)]
            for row in self.predict_arrays(arrays, tta=tta)
        ]
        return answers[0] if single else answers

    predict = __call__

    def answer(self, probs: np.ndarray, unknown_score: float | None, top: int, min_confidence: float = 0.0) -> dict:
        """The answer about one image, as predict-image --json and the API give it: ``top`` (label, probability best
        first), ``label`` (the best species, or None when the photo is judged unknown or its top probability is below
        ``min_confidence``), and for a calibrated model ``unknown`` and ``unknown_score``."""
        best = self.top_k(probs, top)
        unknown = self.is_unknown(unknown_score)
        answer = {
            "top": [{"label": label, "probability": p} for label, p in best],
            "label": None if unknown or best[0][1] < min_confidence else best[0][0],
        }
        if unknown is not None:
            answer |= {"unknown": bool(unknown), "unknown_score": float(unknown_score)}
        return answer

    def top_k(self, probs: np.ndarray, top: int) -> list[tuple[str, float]]:
        """One row of probabilities -> the ``top`` most likely (label, probability) pairs, best first."""
        best = np.argsort(-probs, kind="stable")[:top]
        return [(self.labels[i], float(probs[i])) for i in best]


def _onnxruntime_runner(path: Path, threads: int, shares_cpu: bool) -> Callable[[np.ndarray], list[np.ndarray]]:
    """uint8 pixels in the file's layout -> the graph's outputs (probabilities, unknown scores), by onnxruntime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if shares_cpu:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have no common public base
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path} cannot be loaded by onnxruntime ({detail}); re-export it") from None
    input_name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {input_name: pixels})


def _openvino_runner(path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    """uint8 pixels in the file's layout -> the graph's outputs, by OpenVINO: float32 inference (its default on CPUs
    with bfloat16 units rounds the graph's 8-bit resize differently: 0.7 % of labels changed on cub100-lr), one
    infer request per calling thread."""
    import openvino

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    try:
        compiled = openvino.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses without a common public base
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"{path} cannot be loaded by OpenVINO ({detail}); re-export it, or set {RUNTIME_VARIABLE}=onnxruntime"
        ) from None
    requests = threading.local()

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        outputs = requests.request.infer({0: pixels})
        return [np.array(outputs[i]) for i in range(len(outputs))]  # copies: the request reuses its output buffers

    return run


def uint8_pixels(array: np.ndarray) -> np.ndarray:
    """``array`` as uint8 when its values are whole numbers 0-255; floats are refused rather than guessed (is 1.0
    white, or almost black?)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iu" or array.size == 0 or array.min() < 0 or array.max() > 255:
        low, high = (f"{array.min():g}", f"{array.max():g}") if array.size and array.dtype.kind in "iuf" else ("?", "?")
        raise UserError(
            f"expected uint8 pixels (0-255), got a {array.dtype} array with values {low} to {high}; for floats in "
            "[0, 1] pass (array * 255).round().astype(np.uint8), or pass the file path or PIL image"
        )
    return array.astype(np.uint8)


def to_model_input(image: ImageInput) -> np.ndarray:
    """Path / PIL image / H x W x 3 (or 3 x H x W) uint8 array -> 64x64x3 uint8, downscaled like the training
    images when larger. Float arrays are refused rather than guessed (is 1.0 white, or almost black?)."""
    if isinstance(image, (str, Path)):
        array = decode_image(Path(image))
    elif isinstance(image, Image.Image):
        array = to_rgb_array(image)
    else:
        array = uint8_pixels(np.asarray(image.cpu() if hasattr(image, "cpu") else image))  # numpy or torch
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)  # channels first (torchvision.io.read_image) -> H x W x 3
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise UserError(
                f"expected one H x W x 3 image array, got shape {array.shape}; pass a list for several images"
            )
    return fit_square(array, LR_SIZE)


def resolve_ensemble(sources: list[Path], mode: str | None = None) -> tuple[list[Path], list[float] | None]:
    """(members, weights): a folds folder (``train --folds``) stands for its fold runs and an ensemble recipe's folder
    for its members' runs; ``mode`` ``mean`` gives no weights (a plain mean), ``f1`` weighs each member by its kept
    weights' validation macro-F1, normalised, as the competition's 1st place weighted its fold ensemble; None: what one
    ensemble folder records (``ensemble.json``), else mean."""
    if mode is None:
        mode = recorded_prediction(sources)["ensemble"]
    if mode not in ENSEMBLE_MODES:
        raise UserError(f"unknown ensemble {mode!r}: use one of {', '.join(ENSEMBLE_MODES)}")
    members = [run for source in sources for run in model_folders(source)]
    if mode == "mean":
        return members, None
    for member in members:
        refuse_without_metrics(member)
    return members, f1_weights(members, "--ensemble f1", "use --ensemble mean")


def refuse_without_metrics(source: Path) -> None:
    """An ONNX file or an exported Hugging Face folder records no validation macro-F1 to weigh it by: refused."""
    if Path(source).suffix == ".onnx" or is_hf_folder(source):
        kind = "an ONNX file" if Path(source).suffix == ".onnx" else "an exported Hugging Face folder"
        raise UserError(
            f"--ensemble f1 weighs each model by the validation macro-F1 in its run folder; {source} is {kind}, which "
            "records none: "
            "pass its run folder or use --ensemble mean"
        )


def describe_ensemble(members: list[Path], weights: list[float] | None) -> str:
    """One line: every member and its weight."""
    shares = member_shares(weights, len(members))
    how = "weighted by validation macro-F1" if weights else "plain mean"
    return f"ensemble of {len(members)} ({how}): " + ", ".join(
        f"{member} {share:.3f}" for member, share in zip(members, shares)
    )


@dataclass
class Predictions:
    """What one model or an ensemble says about N images: calibrated probabilities, and the unknown score with its
    threshold (both None when a model has no calibration)."""

    labels: list[str]
    probs: np.ndarray
    unknown_scores: np.ndarray | None
    unknown_threshold: float | None

    @property
    def unknown(self) -> np.ndarray | None:
        """True where an image is judged not one of the training species; None without calibration."""
        return None if self.unknown_scores is None else self.unknown_scores > self.unknown_threshold


def predict_test_set(
    runs: list[Path], data_dir: Path, tta: str | None = None, device: str = "cpu", weights: list[float] | None = None
) -> tuple[list[str], Predictions]:
    """(ids in submission order, the predictions averaged over the runs)."""
    table = load_test_table(data_dir)
    return table.ids, predict_files(runs, table.lr_paths, tta, device, weights)


def predict_files(
    sources: list[Path],
    paths: list[Path],
    tta: str | None = None,
    device: str = "cpu",
    weights: list[float] | None = None,
) -> Predictions:
    """The predictions averaged over the models (or weighted by ``weights``) for image files of any size, each
    reduced to 64x64."""
    classifiers = [Classifier.load(source, device) for source in sources]  # a bad model fails before any decoding
    return average_predictions(classifiers, load_images(paths, LR_SIZE), tta, weights)


def average_predictions(
    classifiers: list[Classifier], images: np.ndarray, tta: str | None, weights: list[float] | None = None
) -> Predictions:
    """The classifiers as one (``Classifier.combine``), calibrated, with ``tta`` on the combined model (what an
    exported ensemble computes; None: its own, a single ONNX file's recorded one): its probabilities, and its unknown
    scores and threshold when every classifier has them."""
    model = Classifier.combine(classifiers, weights)
    count = f" x {len(classifiers)} models" if len(classifiers) > 1 else ""
    probs, unknown = model.predict_scores(images, tta=tta, progress=f"predicting {len(images)} images{count}")
    return Predictions(model.labels, probs, unknown, None if unknown is None else model.unknown_threshold)


def top_k_table(paths: list, predictions: Predictions, top: int, min_confidence: float = 0.0) -> pd.DataFrame:
    """path, label, score (the best class), then label_2, score_2 ... label_K, score_K: one row per image; then
    ``unknown`` (1: not one of the training species) and ``unknown_score`` for a calibrated model. ``label`` is empty
    where the photo is judged unknown (as the API's null) or, with ``min_confidence``, where the top probability is
    below it (abstained); the closest species stay in the other columns."""
    import pandas as pd

    labels, probs = predictions.labels, predictions.probs
    top = min(top, len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    columns: dict[str, list] = {"path": [str(p) for p in paths]}
    for rank in range(top):
        suffix = "" if rank == 0 else f"_{rank + 1}"
        columns[f"label{suffix}"] = [labels[i] for i in order[:, rank]]
        columns[f"score{suffix}"] = np.round(probs[np.arange(len(probs)), order[:, rank]], 6)
    unknown = predictions.unknown if predictions.unknown is not None else np.zeros(len(probs), bool)
    columns["label"] = [
        label if score >= min_confidence and not flagged else ""
        for label, score, flagged in zip(columns["label"], columns["score"], unknown)
    ]
    if predictions.unknown is not None:
        columns["unknown"] = predictions.unknown.astype(int)
        columns["unknown_score"] = np.round(predictions.unknown_scores, 6)
    return pd.DataFrame(columns)
