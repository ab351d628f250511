"""Shared fixtures: small synthetic data sets in the competition layout and a trained tiny run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lowres_birds.cli import main
from lowres_birds.data.demo import make_demo_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub100-lr"
# Both without the cpu recipe's HR teacher (tests of the teacher switch it back on).
TINY_TRAIN = [
    "--model",
    "efficientnet_lite0",
    "--strategy",
    "native",
    "--kd-weight",
    "0",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--device",
    "cpu",
]
# Seconds, not minutes: a tiny untrained timm network, for tests that need any finished run, not a good one.
FAST_TRAIN = [
    "--model",
    "timm:test_efficientnet",
    "--no-pretrained",
    "--strategy",
    "native",
    "--kd-weight",
    "0",
    "--epochs",
    "1",
    "--device",
    "cpu",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session decodes into its own image cache, never the user's."""
    monkeypatch.setenv("LOWRES_BIRDS_CACHE", str(tmp_path_factory.getbasetemp() / "image-cache"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """3 species, 10 training images each (64x64 + 256x256 twins), 6 test images each."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", train_per_class=10, test_per_class=6, classes=3)


@pytest.fixture(scope="session")
def trained_run(demo_data, tmp_path_factory) -> Path:
    """One tiny finished run (pretrained lite0 at native 64, one epoch) shared by read-only tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    os.environ["LOWRES_BIRDS_CACHE"] = str(tmp_path_factory.getbasetemp() / "image-cache")
    assert main(["train", "--data", str(demo_data), "--out", str(run_dir), *TINY_TRAIN]) == 0
    return run_dir


@pytest.fixture(scope="session")
def winners_run(demo_data, tmp_path_factory) -> Path:
    """A tiny run with the competition winner's options on: TrivialAugment, RandomErasing, class-balanced loss and a
    Lanczos upscale to 96."""
    run_dir = tmp_path_factory.mktemp("runs") / "winners"
    os.environ["LOWRES_BIRDS_CACHE"] = str(tmp_path_factory.getbasetemp() / "image-cache")
    assert (
        main(
            [
                "train",
                "--data",
                str(demo_data),
                "--out",
                str(run_dir),
                *FAST_TRAIN,
                "--strategy",
                "upscale:96",
                "--trivial-augment",
                "--random-erasing",
                "0.5",
                "--class-balanced-beta",
                "0.99",
                "--upscale-filter",
                "lanczos",
                "--label-smoothing",
                "0.05",
            ]
        )
        == 0
    )
    return run_dir


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "train.csv").is_file():
        pytest.skip("../shared/data/cub100-lr is not present on this machine")
    return SHARED_DATA


def write_tiny_beit_run(folder: Path, labels: list[str], size: int = 96, **beit) -> Path:
    """A loadable run folder around a tiny randomly initialised Hugging Face BEiT (what training would write
    besides the metrics): config, architecture, labels and weights."""
    from transformers import BeitConfig

    from lowres_birds.config import load_config
    from lowres_birds.model.factory import create_model, save_architecture
    from lowres_birds.run_dir import RunDir

    config_dir = folder.parent / f"{folder.name}-config"
    BeitConfig(
        image_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **beit
    ).save_pretrained(config_dir)
    model = create_model(f"hf:{config_dir}", labels, size, pretrained=False)
    run = RunDir(folder)
    save_architecture(model, run)
    run.write_labels(labels)
    run.save_weights(model.state_dict())
    run.write_config(load_config("beit-seed", {"model": f"hf:{config_dir}", "strategy": f"upscale:{size}"}))
    return folder


def save_tiny_beit(folder: Path, size: int = 64, **beit) -> Path:
    """A randomly initialised 2-layer Hugging Face BEiT saved with save_pretrained (weights and processor), loadable
    offline as --model hf:FOLDER the way a Hub checkpoint would be."""
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor

    config = BeitConfig(
        image_size=size,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        **beit,
    )
    BeitForImageClassification(config).save_pretrained(folder)
    BeitImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    ).save_pretrained(folder)
    return folder
