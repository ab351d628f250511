"""benchmarks/int8_qat.py, quantization-aware tuning for int8: the torch simulation must be the int8 model
onnxruntime builds (same quantizers, same ranges), or tuning against it tunes for the wrong model."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lowres_birds.model.factory import load_run_model
from lowres_birds.model.resolution import to_nchw
from lowres_birds.predict.classifier import RUNTIME_VARIABLE, Classifier
from lowres_birds.predict.export import calibration_images, onnx_program

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from int8_qat import FakeQuantized, fold_batchnorm, quantize_with_ranges, quantized_activations, tune_for_int8  # noqa: E402


def probabilities(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(to_nchw(images)).softmax(-1).numpy()


def test_fake_quantization_is_the_int8_model_onnxruntime_builds(trained_run, tmp_path, monkeypatch):
    """Folding BatchNorm changes nothing; the simulated quantizers are onnxruntime's (one per quantized
    activation, in graph order), their ranges end up in the int8 file, and the simulation predicts what that
    file predicts closer than fp32 does (not exactly: about 0.3 of the fp32 gap remains on this tiny model)."""
    model, labels = load_run_model(trained_run)
    images = calibration_images(trained_run, count=48)
    student = copy.deepcopy(model)
    fold_batchnorm(student)
    fp32 = probabilities(model, images)
    np.testing.assert_allclose(probabilities(student, images), fp32, atol=1e-5)

    quantized = FakeQuantized(student)
    probabilities(student, images)  # observe the activation ranges
    quantized.observe(False)
    simulated = probabilities(student, images)
    ranges = quantized.activation_ranges()
    path = tmp_path / "int8.onnx"
    program = onnx_program([(quantized.remove(), None)], labels, "nhwc", "int8")
    quantize_with_ranges(program.model_proto, path, images, ranges)

    int8_model = onnx.load(str(path))
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in int8_model.graph.initializer}
    scales = {
        node.input[0]: float(weights[node.input[1]])
        for node in int8_model.graph.node
        if node.op_type == "QuantizeLinear"
    }
    assert [scales[name] for name in quantized_activations(int8_model)] == pytest.approx(
        [scale for scale, _ in ranges], rel=1e-6
    )
    monkeypatch.setenv(RUNTIME_VARIABLE, "onnxruntime")  # int8 files default to OpenVINO, whose kernels round otherwise
    onnxruntime_int8 = Classifier.load(path).predict_arrays(images)
    assert np.abs(onnxruntime_int8 - simulated).max() < 0.5 * np.abs(onnxruntime_int8 - fp32).max()


def test_tuning_is_deterministic_and_leaves_the_run_model_alone(trained_run):
    model, _ = load_run_model(trained_run)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images = calibration_images(trained_run, count=40)
    first, second = (tune_for_int8(model, images, steps=3) for _ in range(2))
    assert first.activation_ranges == second.activation_ranges
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    tuned = first.model.state_dict()
    assert not any(
        torch.equal(tuned[name], tensor)
        for name, tensor in folded.state_dict().items()
        if name.endswith("conv_pw.weight")
    )
