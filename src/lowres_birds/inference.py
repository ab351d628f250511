"""Prediction: load a trained run (or an exported ONNX model) and turn uint8 images into probabilities.

``Classifier`` is the one code path the CLI, the server and the Python API share: any image is brought
to the run's low-res input (downscaled to 64x64 first when larger, as the training images were), then
the model wrapper resizes and normalises exactly as in training.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lowres_birds.data import LabelMap, decode_image, fit_square, load_images, load_test_table, to_rgb_array
from lowres_birds.errors import UserError
from lowres_birds.resolution import LR_SIZE

TTA_MODES = ("none", "flip")


class Classifier:
    """A trained model ready to predict: ``Classifier.load(run_dir_or_onnx).predict(image, top=5)``."""

    def __init__(self, labels: list[str], predict_fn, name: str, input_size: int):
        self.labels = labels
        self._predict_fn = predict_fn  # uint8 N x 3 x 64 x 64 numpy -> probabilities N x C
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

        @torch.inference_mode()
        def predict_fn(images: np.ndarray) -> np.ndarray:
            logits = model(torch.from_numpy(np.ascontiguousarray(images)).to(device))
            return logits.float().softmax(-1).cpu().numpy()

        return cls(labels, predict_fn, str(run_dir), model.spec.input_size)

    @classmethod
    def _load_onnx(cls, path: Path) -> "Classifier":
        import onnx
        import onnxruntime as ort

        if not path.is_file():
            raise UserError(f"ONNX model {path} not found; create it with: lowres-birds export --run RUN --out {path}")
        metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "labels" not in metadata:
            raise UserError(f"{path} was not exported by lowres-birds (no label metadata); re-export it")
        import json

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("LOWRES_BIRDS_THREADS", "0")) or (os.cpu_count() or 1)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        channels_last = metadata.get("layout") == "nhwc"  # see export.py; predict_fn receives NCHW

        def predict_fn(images: np.ndarray) -> np.ndarray:
            if channels_last:
                images = images.transpose(0, 2, 3, 1)
            return session.run(None, {input_name: np.ascontiguousarray(images)})[0]

        return cls(json.loads(metadata["labels"]), predict_fn, str(path), int(metadata.get("input_size", 0)))

    def predict_arrays(self, images: np.ndarray, tta: str = "none", batch_size: int = 64) -> np.ndarray:
        """uint8 N x 64 x 64 x 3 (or N x 3 x 64 x 64) -> probabilities N x C, optionally flip-averaged."""
        if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.transpose(0, 3, 1, 2)
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[start : start + batch_size])
            probs = self._predict_fn(batch)
            if tta == "flip":
                probs = (probs + self._predict_fn(np.ascontiguousarray(batch[..., ::-1]))) / 2
            outputs.append(probs)
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.labels)), np.float32)

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


def load_run_model(run_dir: Path, device: str = "cpu"):
    """(BirdNet in eval mode with the run's best weights, label names)."""
    from safetensors.torch import load_file

    from lowres_birds.models import rebuild_model
    from lowres_birds.training import BEST_WEIGHTS

    run_dir = Path(run_dir)
    weights = run_dir / BEST_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{run_dir} is not a finished run (no {BEST_WEIGHTS}); train it first or pass the right --run")
    labels = list(LabelMap.load(run_dir / "labels.json").classes)
    model = rebuild_model(run_dir, labels)
    model.load_state_dict(load_file(str(weights)))
    return model.eval().to(device), labels


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


def write_atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        frame.to_csv(temporary, index=False)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
