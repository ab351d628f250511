"""Prediction: load a trained run (or an exported ONNX model) and turn uint8 images into probabilities.

``Classifier`` is the one code path the CLI, the server and the Python API share: any image is brought
to the run's low-res input (downscaled to 64x64 first when larger, as the training images were), then
the model wrapper resizes and normalises exactly as in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lowres_birds.config import LR_SIZE
from lowres_birds.data.images import decode_image, fit_square, load_images, to_rgb_array
from lowres_birds.data.tables import load_test_table
from lowres_birds.errors import UserError
from lowres_birds.extras import require as require_extra
from lowres_birds.model.factory import load_run_model
from lowres_birds.model.wrapper import in_batches

TTA_MODES = ("none", "flip")


class Classifier:
    """A trained model ready to predict: ``Classifier.load(run_dir_or_onnx).predict(image, top=5)``."""

    def __init__(self, labels: list[str], predict_fn, name: str, input_size: int):
        self.labels = labels
        self._predict_fn = predict_fn  # uint8 N x 3 x 64 x 64 tensor -> probabilities N x C
        self.name = name
        self.input_size = input_size

    @classmethod
    def load(cls, source: str | Path, device: str = "cpu") -> "Classifier":
        source = Path(source)
        if source.suffix == ".onnx":
            return cls._load_onnx(source)
        return cls._load_run(source, device)

    @classmethod
    def _load_run(cls, run_dir: Path, device: str) -> "Classifier":
        model, labels = load_run_model(run_dir, device)

        def predict_fn(images: torch.Tensor) -> torch.Tensor:
            return model(images.to(device)).float().softmax(-1)

        return cls(labels, predict_fn, str(run_dir), model.spec.input_size)

    @classmethod
    def _load_onnx(cls, path: Path) -> "Classifier":
        require_extra("onnx", "an ONNX model")
        import onnx
        import onnxruntime as ort

        if not path.is_file():
            raise UserError(f"ONNX model {path} not found; create it with: lowres-birds export --run RUN --out {path}")
        try:
            metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as exc:  # noqa: BLE001 - protobuf's decode errors have no common public base
            raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None
        if "labels" not in metadata:
            raise UserError(f"{path} was not exported by lowres-birds (no label metadata); re-export it")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("LOWRES_BIRDS_THREADS", "0")) or (os.cpu_count() or 1)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        channels_last = metadata.get("layout") == "nhwc"  # see export.py; predict_fn receives NCHW

        def predict_fn(images: torch.Tensor) -> torch.Tensor:
            pixels = images.permute(0, 2, 3, 1) if channels_last else images
            return torch.from_numpy(session.run(None, {input_name: np.ascontiguousarray(pixels.numpy())})[0])

        try:
            labels, input_size = json.loads(metadata["labels"]), int(metadata.get("input_size", 0))
        except (json.JSONDecodeError, ValueError):
            labels, input_size = None, 0
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise UserError(f"{path}: its 'labels' metadata is not a JSON list of class names; re-export it")
        return cls(labels, predict_fn, str(path), input_size)

    def predict_arrays(self, images: np.ndarray, tta: str = "none", batch_size: int = 64) -> np.ndarray:
        """uint8 N x 64 x 64 x 3 (or N x 3 x 64 x 64) -> probabilities N x C, optionally flip-averaged."""
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)

        def probabilities(batch: torch.Tensor) -> torch.Tensor:
            probs = self._predict_fn(batch)
            return (probs + self._predict_fn(batch.flip(-1))) / 2 if tta == "flip" else probs

        probs = in_batches(probabilities, images, batch_size)
        return probs if len(probs) else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, image, top: int = 5, tta: str = "none") -> list[tuple[str, float]]:
        """One image (path, PIL image or HxWx3 uint8 array) -> the top-k (label, probability) pairs."""
        array = to_model_input(image)
        return self.top_k(self.predict_arrays(array[None], tta=tta)[0], top)

    def top_k(self, probs: np.ndarray, top: int) -> list[tuple[str, float]]:
        """One row of probabilities -> the ``top`` most likely (label, probability) pairs, best first."""
        best = np.argsort(-probs)[:top]
        return [(self.labels[i], float(probs[i])) for i in best]


def to_model_input(image) -> np.ndarray:
    """Path / PIL / array -> 64x64x3 uint8, area-downscaled like the training images when larger."""
    if isinstance(image, (str, Path)):
        array = decode_image(Path(image))
    elif isinstance(image, Image.Image):
        array = to_rgb_array(image)
    else:
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise UserError(f"expected an H x W x 3 image array, got shape {array.shape}")
    return fit_square(array, LR_SIZE)


def predict_test_set(runs: list[Path], data_dir: Path, tta: str = "none", device: str = "cpu") -> tuple[list[str], list[str], np.ndarray]:
    """(ids in submission order, class names, mean probabilities over the runs)."""
    table = load_test_table(data_dir)
    images = load_images(table.lr_paths, LR_SIZE)
    return table.ids, *average_probabilities([Classifier.load(run, device) for run in runs], images, tta)


def average_probabilities(classifiers: list[Classifier], images: np.ndarray, tta: str) -> tuple[list[str], np.ndarray]:
    """Mean of the classifiers' probabilities; every classifier must share the same classes."""
    labels = classifiers[0].labels
    for classifier in classifiers[1:]:
        if classifier.labels != labels:
            raise UserError(f"{classifier.name} was trained on different classes than {classifiers[0].name}; cannot average")
    probs = np.mean([c.predict_arrays(images, tta=tta) for c in classifiers], axis=0)
    return labels, probs
