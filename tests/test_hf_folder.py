"""`export --format hf`: a folder that transformers.pipeline (and timm) load offline and that agrees with
lowres-birds on the top-1 class; Classifier.load reads it back; train writes it too."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TINY_TRAIN, write_tiny_beit_run

from lowres_birds.cli import main
from lowres_birds.predict.classifier import Classifier

CUB_TEST_IMAGES = None if os.environ.get("LOWRES_BIRDS_SLOW_TESTS") else 300  # all 1,773 with LOWRES_BIRDS_SLOW_TESTS=1


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing may come from a hub: the folder must load from disk alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def pipeline_top1(folder, paths) -> list[str]:
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(folder))
    return [answer[0]["label"] for answer in classify([str(p) for p in paths], top_k=1, batch_size=32)]


def predict_image_top1(folder, paths, capsys) -> list[str]:
    """What `lowres-birds predict-image FOLDER --json` answers, image by image."""
    capsys.readouterr()
    assert main(["predict-image", *map(str, paths), "--run", str(folder), "--top", "1", "--json"]) == 0
    return [answer["top"][0]["label"] for answer in json.loads(capsys.readouterr().out)]


def test_train_writes_the_hf_folder_with_a_model_card(trained_run):
    folder = trained_run / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert config["label_names"] == json.loads((trained_run / "labels.json").read_text())
    assert (
        config["pretrained_cfg"]["input_size"] == [3, 64, 64] and config["pretrained_cfg"]["interpolation"] == "bicubic"
    )
    assert (folder / "model.safetensors").stat().st_size > 1_000_000
    card = (folder / "README.md").read_text()
    for needed in (
        "pipeline_tag: image-classification",
        "## Intended use",
        "## Limits",
        "64x64",
        "macro-F1",
        "validation split of",
        "strategy `native`",
    ):
        assert needed in card, needed


def test_pipeline_agrees_with_predict_image_on_every_demo_image(trained_run, demo_data, tmp_path, capsys):
    """An upscaling run, so the pipeline's own resize (PIL bicubic to the input size) is what is compared."""
    run = tmp_path / "run96"
    assert main(["train", "--data", str(demo_data), "--out", str(run), *TINY_TRAIN, "--strategy", "upscale:96"]) == 0
    folder = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "README.md",
        "calibration.json",  # the unknown score and threshold (the temperature is folded into the weights)
        "config.json",
        "model.safetensors",
        "unknown.safetensors",
    ]
    paths = sorted((demo_data / "test").glob("*.jpg"))

    ours = predict_image_top1(folder, paths, capsys)
    assert ours == predict_image_top1(run, paths, capsys)  # the folder is the run
    assert pipeline_top1(folder, paths) == ours  # 100 % on the demo data


def test_pipeline_agrees_on_cub100_lr_test_images(shared_data, tmp_path, capsys):
    """A tiny run on 8 images of each of 10 cub100-lr species (an ImageFolder of links), then the test images."""
    import pandas as pd

    folder = tmp_path / "cub-subset"
    train = pd.read_csv(shared_data / "train.csv")
    for name in sorted(train["label"].unique())[:10]:
        (folder / name).mkdir(parents=True)
        for relative in train.loc[train["label"] == name, "img_path"].head(8):
            (folder / name / os.path.basename(relative)).symlink_to((shared_data / relative).resolve())
    run, exported = tmp_path / "run", tmp_path / "run-hf"
    assert (
        main(
            [
                "train",
                "--data",
                str(folder),
                "--out",
                str(run),
                *TINY_TRAIN,
                "--strategy",
                "upscale:96",
                "--val-fraction",
                "0.25",
            ]
        )
        == 0
    )
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(exported)]) == 0
    paths = sorted((shared_data / "test").glob("*.jpg"))[:CUB_TEST_IMAGES]

    ours, theirs = predict_image_top1(exported, paths, capsys), pipeline_top1(exported, paths)
    agreement = sum(a == b for a, b in zip(ours, theirs)) / len(paths)
    print(f"pipeline vs predict-image: {agreement:.2%} of {len(paths)} cub100-lr test images")
    assert agreement >= 0.98


def test_timm_loads_the_folder_too(trained_run, demo_data):
    import numpy as np
    import timm
    import torch
    from PIL import Image

    model = timm.create_model(f"local-dir:{trained_run / 'hf'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    photo = sorted((demo_data / "test").glob("*.jpg"))[0]
    with torch.no_grad():
        probs = model(transform(Image.open(photo).convert("RGB"))[None]).softmax(-1)[0].numpy()
    expected = Classifier.load(trained_run).predict_arrays(np.asarray(Image.open(photo).convert("RGB"))[None])[0]
    np.testing.assert_allclose(probs, expected, atol=1e-4)


def test_hugging_face_backbones_export_to_a_transformers_folder(tmp_path):
    import numpy as np

    from lowres_birds.run_dir import RunDir

    run_dir = write_tiny_beit_run(tmp_path / "beit-run", ["a", "b", "c"])
    run = RunDir(run_dir)
    run.write_split(tmp_path, ["x"], "fingerprint")
    folder = tmp_path / "beit-hf"
    assert main(["export", "--run", str(run_dir), "--format", "hf", "--out", str(folder)]) == 0
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 96, "width": 96} and processor["resample"] == 3
    assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}

    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        Classifier.load(folder).predict_arrays(images), Classifier.load(run_dir).predict_arrays(images), atol=1e-5
    )
    from PIL import Image
    from transformers import pipeline

    answers = pipeline("image-classification", model=str(folder))([Image.fromarray(i) for i in images], top_k=1)
    assert [a[0]["label"] for a in answers] == [a[0]["label"] for a in Classifier.load(folder)(list(images), top_k=1)]


def test_export_hf_refuses_what_it_cannot_write(trained_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["export", "--run", str(trained_run), "--format", "hf", "--out", str(tmp_path / "taken")]) == 2
    assert "not a lowres-birds output folder" in capsys.readouterr().err
    assert (
        main(["export", "--run", str(trained_run), "--format", "hf", "--out", str(tmp_path / "taken"), "--force"]) == 2
    )
    assert "not a lowres-birds output folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert main(["export", "--run", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize(
    "flag", [["--int8"], ["--layout", "nchw"], ["--fallback-margin", "0.1"], ["--data", "."], ["--tta", "flip"]]
)
def test_export_hf_refuses_the_flags_of_an_onnx_file(trained_run, tmp_path, capsys, flag):
    out = tmp_path / "hf"
    assert main(["export", "--run", str(trained_run), "--format", "hf", "--out", str(out), *flag]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{flag[0]} applies to --format onnx" in error and "\n" not in error and not out.exists()


@pytest.mark.parametrize("out", ["the run", "a folder of ours holding it"])
def test_export_hf_never_replaces_the_run_it_exports(trained_run, tmp_path, capsys, out):
    import shutil

    from lowres_birds.run_dir import MARKER

    holder = tmp_path / "ensemble"
    run = holder / "member"
    shutil.copytree(trained_run, run)
    (holder / MARKER).write_text("made by lowres-birds", encoding="utf-8")
    target = run if out == "the run" else holder
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(target), "--force"]) == 2
    error = capsys.readouterr().err.strip()
    assert "choose another" in error and "--run" in error and "\n" not in error
    assert (run / "model.safetensors").is_file() and (run / "split.json").is_file()


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda folder: (folder / "model.safetensors").write_bytes(b"garbage"), "model.safetensors"),
        (lambda folder: edit_config(folder, model_args=[1, 2]), "'model_args' must be a JSON object"),
        (lambda folder: edit_config(folder, model_args="x"), "'model_args' must be a JSON object"),
    ],
)
def test_a_damaged_hf_folder_is_one_line(trained_run, tmp_path, capsys, damage, named):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(trained_run / "hf", folder)
    damage(folder)
    photo = next((trained_run / "report").glob("*.png"))
    assert main(["predict-image", str(photo), "--run", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err


def edit_config(folder, **values) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, **values}), encoding="utf-8")
