"""An ensemble folder is one model: Classifier.load, predict, predict-image, serve and one ONNX file (every member,
flip TTA inside) give the same calibrated answers, with the weights and TTA the folder records."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from lowres_birds.cli import main
from lowres_birds.data.images import load_images
from lowres_birds.data.tables import load_test_table
from lowres_birds.predict.classifier import Classifier
from lowres_birds.predict.serving import create_app
from lowres_birds.run_dir import MembersDir

# Pretrained lite0 (offline weights) for answers that are not near ties, 9 validation images to calibrate on
FAST = {"strategy": "native", "kd_weight": 0.0, "epochs": 2, "val_fraction": 0.3, "batch_size": 16}


@pytest.fixture(scope="module")
def ensemble(demo_data, tmp_path_factory):
    """Two small calibrated runs (two seeds, two input sizes) as an ensemble folder recording f1 weights and flip
    TTA."""
    from lowres_birds.config import EnsembleRecipe, load_config
    from lowres_birds.predict.calibrate import calibrate
    from lowres_birds.train.ensembles import train_members

    configs = {
        "a": load_config("cpu", {**FAST, "seed": 1}),
        "b": load_config("cpu", {**FAST, "seed": 2, "strategy": "upscale:80"}),
    }
    out = tmp_path_factory.mktemp("ensemble") / "out"
    train_members(EnsembleRecipe(configs, ensemble="f1", tta="flip"), demo_data, out)
    list(calibrate(out, None))
    return out


@pytest.fixture(scope="module")
def test_images(demo_data) -> np.ndarray:
    return load_images(load_test_table(demo_data).lr_paths, 64)


@pytest.fixture(scope="module")
def predicted(ensemble, demo_data, tmp_path_factory):
    """`predict --run OUT --probs` with the folder's own settings and with --tta none."""
    folder = tmp_path_factory.mktemp("predicted")
    tables = {}
    for tta in ("flip", "none"):
        flags = [] if tta == "flip" else ["--tta", "none"]
        out, probs = folder / f"{tta}.csv", folder / f"{tta}-probs.csv"
        command = ["predict", "--run", str(ensemble), "--data", str(demo_data), "--out", str(out)]
        assert main([*command, "--probs", str(probs), *flags]) == 0
        tables[tta] = pd.read_csv(probs)
    return tables


@pytest.fixture(scope="module")
def exported(ensemble, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    files = {"flip": folder / "flip.onnx", "none": folder / "none.onnx", "int8": folder / "int8.onnx"}
    assert main(["export", "--run", str(ensemble), "--out", str(files["flip"])]) == 0  # the folder's flip TTA
    assert main(["export", "--run", str(ensemble), "--tta", "none", "--out", str(files["none"])]) == 0
    assert main(["export", "--run", str(ensemble), "--int8", "--out", str(files["int8"])]) == 0
    return files


def test_an_ensemble_folder_loads_as_one_model_with_its_recorded_weights_and_tta(ensemble, test_images, predicted):
    model = Classifier.load(ensemble)
    assert model.tta == "flip" and model.unknown_threshold is not None
    # each member's temperature was fitted on the flip-TTA answers the folder gives
    assert all(json.loads((ensemble / m / "calibration.json").read_text())["tta"] == "flip" for m in ("a", "b"))
    members = [Classifier.load(ensemble / name) for name in ("a", "b")]
    assert model.temperature != 1 and model.labels == members[0].labels
    probs, unknown = model.predict_scores(test_images)
    table = predicted["flip"]
    np.testing.assert_allclose(probs, table[model.labels].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(unknown, table["unknown_score"].to_numpy(), atol=1e-5)
    # flip TTA is the folder's: asking for none differs, and equals predict --tta none
    plain, _ = model.predict_scores(test_images, tta="none")
    np.testing.assert_allclose(plain, predicted["none"][model.labels].to_numpy(), atol=1e-5)
    assert not np.allclose(plain, probs, atol=1e-4)
    # the recorded f1 weights: the members' validation macro-F1, normalised (not a plain mean, unless they tie)
    scores = MembersDir(ensemble).summary()["val_macro_f1"]
    weights = np.array([scores["a"], scores["b"]]) / sum(scores.values())
    assert np.isclose(model.temperature, weights @ [m.temperature for m in members], atol=1e-6)


@pytest.mark.parametrize("tta", ["flip", "none"])
def test_one_onnx_file_holds_every_member_and_answers_as_predict(exported, test_images, predicted, tta):
    metadata = {p.key: p.value for p in onnx.load(str(exported[tta]), load_external_data=False).metadata_props}
    assert metadata["tta"] == tta and [m["input_size"] for m in json.loads(metadata["members"])] == [64, 80]
    model = Classifier.load(exported[tta])
    assert model.tta == tta and model.flip_inside == (tta == "flip")
    probs, unknown = model.predict_scores(test_images)
    table = predicted[tta]
    np.testing.assert_allclose(probs, table[model.labels].to_numpy(), atol=1e-4)
    np.testing.assert_allclose(unknown, table["unknown_score"].to_numpy(), rtol=1e-5)  # distances in the 1000s
    assert (probs.argmax(1) == table[model.labels].to_numpy().argmax(1)).all()
    # asking for flip gives predict --tta flip's answers: a file with flip inside does not mirror twice
    again = model.predict_scores(test_images, tta="flip")[0]
    np.testing.assert_allclose(again, predicted["flip"][model.labels].to_numpy(), atol=1e-4)


def test_the_int8_ensemble_quantizes_every_member_and_keeps_their_first_convolutions_in_float(
    exported, test_images, predicted
):
    int8 = onnx.load(str(exported["int8"]))
    dequantized = {node.output[0] for node in int8.graph.node if node.op_type == "DequantizeLinear"}
    convolutions = [node for node in int8.graph.node if node.op_type == "Conv"]
    float_convs = [node for node in convolutions if node.input[1] not in dequantized]
    # one float first convolution per member per pass (the image and its mirror), both members' networks quantized
    assert len(float_convs) == 4 and len(convolutions) > 4
    labels = Classifier.load(exported["int8"]).predict_arrays(test_images).argmax(1)
    reference = predicted["flip"].drop(columns=["id", "unknown", "unknown_score"]).to_numpy().argmax(1)
    assert (labels == reference).mean() >= 0.9


def test_serve_and_predict_image_answer_with_the_ensemble(ensemble, demo_data, capsys):
    photo = sorted((demo_data / "test").glob("*.jpg"))[0]
    model = Classifier.load(ensemble)
    with TestClient(create_app(model)) as client:
        assert client.get("/api/health").json()["tta"] == "flip"
        answer = client.post("/api/predict", files={"file": ("p.jpg", photo.read_bytes(), "image/jpeg")}).json()
    expected = model.answer(*[part[0] for part in model.predict_scores(load_images([photo], 64))], 5)
    assert answer["label"] == expected["label"]
    assert np.isclose(answer["top"][0]["probability"], expected["top"][0]["probability"], atol=1e-6)
    assert main(["predict-image", str(photo), "--run", str(ensemble), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]
    assert printed["label"] == expected["label"] and np.isclose(printed["unknown_score"], expected["unknown_score"])


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "--data", "{data}", "--out", "{tmp}/s.csv"],
        ["predict-image", "{photo}"],
        ["export", "--out", "{tmp}/m.onnx"],
        ["evaluate", "--data", "{data}/test"],
    ],
)
@pytest.mark.parametrize(
    "damage, message",
    [
        ({"ensemble": "median"}, "'ensemble' must be one of mean, f1"),
        ({"tta": "rotate"}, "'tta' one of none, flip"),
        ({"student_val_macro_f1": "high"}, "'student_val_macro_f1' a number"),
    ],
)
def test_a_damaged_ensemble_record_is_one_line_for_every_command(
    ensemble, demo_data, tmp_path, capsys, command, damage, message
):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ensemble, copy)
    summary = json.loads((copy / MembersDir.SUMMARY).read_text()) | damage
    (copy / MembersDir.SUMMARY).write_text(json.dumps(summary))
    photo = sorted((demo_data / "test").glob("*.jpg"))[0]
    argv = [part.format(data=demo_data, tmp=tmp_path, photo=photo) for part in command]
    assert main([*argv, "--run", str(copy)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "ensemble.json" in error and "\n" not in error


def test_a_hugging_face_folder_of_an_ensemble_is_refused_naming_what_to_export(ensemble, tmp_path, capsys):
    assert main(["export", "--format", "hf", "--run", str(ensemble), "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err.strip()
    assert "is an ensemble of 2 runs" in error and "--format onnx" in error and "\n" not in error
    assert main(["export", "--format", "hf", "--tta", "flip", "--run", str(ensemble / "a")]) == 2
    assert "--tta applies to --format onnx" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "what"),
    [
        (["report", "--out", "{tmp}/out"], "a report covers one run"),
        (["evaluate", "--degradations", "default", "--out-dir", "{tmp}/out"], "on its own validation split"),
    ],
)
def test_commands_of_one_run_refuse_an_ensemble_folder_naming_its_runs(ensemble, tmp_path, capsys, command, what):
    assert main([*(part.format(tmp=tmp_path) for part in command), "--run", str(ensemble)]) == 2
    error = capsys.readouterr().err.strip()
    assert what in error and f"holds 2 runs; pass one of them ({ensemble / 'a'}, {ensemble / 'b'})" in error
    assert "\n" not in error and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "record, message",
    [
        ({"tta": "sideways"}, "its 'tta' metadata 'sideways'"),
        ({"temperature": "nan"}, "'temperature' metadata must be a number above 0"),
        ({"temperature": "0"}, "'temperature' metadata must be a number above 0"),
        ({"temperature": "-0.5"}, "'temperature' metadata must be a number above 0"),
        ({"temperature": "warm"}, "'temperature' metadata must be a number above 0"),
        ({"unknown_threshold": "inf"}, "'unknown_threshold' a finite number"),
    ],
)
def test_an_onnx_file_with_a_bad_record_is_refused_in_one_line(exported, tmp_path, record, message):
    from lowres_birds.errors import UserError
    from lowres_birds.predict.export import set_metadata

    model = onnx.load(str(exported["none"]))
    set_metadata(model, record)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(UserError, match=message) as error:
        Classifier.load(tmp_path / "bad.onnx")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("threads", ["two", "0", "-1", "1.5"])
def test_a_bad_thread_count_for_onnx_is_one_line(exported, monkeypatch, threads):
    from lowres_birds.errors import UserError

    monkeypatch.setenv("LOWRES_BIRDS_THREADS", threads)
    with pytest.raises(UserError, match=f"LOWRES_BIRDS_THREADS='{threads}' is not a number of threads"):
        Classifier.load(exported["none"])
    monkeypatch.setenv("LOWRES_BIRDS_THREADS", "1")
    assert Classifier.load(exported["none"]).labels


def test_a_file_with_flip_inside_answers_with_it_and_refuses_tta_none(exported, demo_data, tmp_path, capsys):
    """--tta none on a file whose graph averages each image with its mirror was ignored without a word."""
    from lowres_birds.errors import UserError

    images = ["--images", str(demo_data / "test")]
    assert main(["predict", "--onnx", str(exported["flip"]), *images, "--out", str(tmp_path / "a.csv")]) == 0
    assert (
        main(["predict", "--onnx", str(exported["flip"]), *images, "--tta", "flip", "--out", str(tmp_path / "b.csv")])
        == 0
    )
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))
    capsys.readouterr()
    assert (
        main(["predict", "--onnx", str(exported["flip"]), *images, "--tta", "none", "--out", str(tmp_path / "c.csv")])
        == 2
    )
    assert "inside its graph (exported with --tta flip)" in capsys.readouterr().err
    with pytest.raises(UserError, match="cannot answer with --tta none"):
        Classifier.load(exported["flip"], tta="none")
    assert not (tmp_path / "c.csv").exists()
