"""Numbered run folders: a command run without --out never reuses or replaces an earlier run."""

from __future__ import annotations

from lowres_birds.cli import main
from conftest import FAST_TRAIN


def test_numbered_folders(tmp_path):
    from lowres_birds.run_dir import numbered_folder

    assert numbered_folder("train", tmp_path) == tmp_path / "train"
    (tmp_path / "train").mkdir()
    (tmp_path / "train2").mkdir()
    assert numbered_folder("train", tmp_path) == tmp_path / "train3"


def test_train_without_out_takes_the_next_numbered_folder(demo_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "train").mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", str(demo_data), *FAST_TRAIN]) == 2
    assert "pass --out under torchrun" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["train", "--data", str(demo_data), *FAST_TRAIN]) == 0
    assert "run folder: runs/train2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "train2" / "model.safetensors").is_file() and not any((tmp_path / "runs" / "train").iterdir())
