"""Distillation from trained models (--distill-from): the ensemble's flip-TTA probabilities on every training image,
computed once into the student's run folder, validated when read back, reused on resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN

from lowres_birds.cli import main
from lowres_birds.run_dir import RunDir

STUDENT = [*FAST_TRAIN[: FAST_TRAIN.index("--kd-weight")], "--kd-weight", "0.7", "--epochs", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def ensemble(demo_data, tmp_path_factory):
    """Two tiny runs on two seeds, as the members of one ensemble folder (an ensemble recipe's layout)."""
    from lowres_birds.config import EnsembleRecipe, load_config
    from lowres_birds.train.ensembles import train_members

    fast = {"model": "timm:test_efficientnet", "pretrained": False, "strategy": "native", "kd_weight": 0.0}
    configs = {name: load_config("cpu", {**fast, "epochs": 2, "seed": seed}) for name, seed in (("a", 1), ("b", 2))}
    out = tmp_path_factory.mktemp("ensemble") / "out"
    train_members(EnsembleRecipe(configs), demo_data, out)
    return out


def test_the_soft_targets_are_the_ensembles_flip_tta_probabilities_on_every_training_image(
    ensemble, demo_data, tmp_path, capsys
):
    from lowres_birds.data.images import load_images
    from lowres_birds.data.tables import load_train_table
    from lowres_birds.predict.classifier import Classifier, average_probabilities, resolve_ensemble

    student = tmp_path / "student"
    assert (
        main(["train", "--data", str(demo_data), "--out", str(student), *STUDENT, "--distill-from", str(ensemble)]) == 0
    )
    assert f"distilling from {ensemble} (2 runs" in capsys.readouterr().out
    saved = RunDir(student).teacher_targets(30, 3, "x", name=RunDir.DISTILL_TARGETS, features=False)
    members, weights = resolve_ensemble([ensemble], "f1")
    images = load_images(load_train_table(demo_data).lr_paths, 64)
    _, expected = average_probabilities([Classifier.load(m) for m in members], images, "flip", weights)
    np.testing.assert_allclose(saved["logits"].exp().numpy(), expected, atol=1e-5)  # what predict --tta flip gives
    assert saved["features"] is None and RunDir(student).config().distill_from == str(ensemble)
    # The model card and the report name the models it learned from, their scores and the student's.
    for page in (student / "hf" / "README.md", student / "report" / "report.html"):
        text = page.read_text(encoding="utf-8")
        assert f"distilled from {ensemble}: 2 run(s)" in text and "this student " in text, page


def test_an_interrupted_distillation_resumes_with_its_cached_targets(ensemble, demo_data, tmp_path, monkeypatch):
    import lowres_birds.train.teacher as teacher
    from lowres_birds.train.state import Checkpointer

    computed = []
    probabilities = teacher.ensemble_probabilities
    monkeypatch.setattr(teacher, "ensemble_probabilities", lambda *a, **k: computed.append(1) or probabilities(*a, **k))
    save = Checkpointer.save

    def save_then_interrupt(self, state):
        save(self, state)
        if state.epoch == 1:
            raise KeyboardInterrupt

    student = tmp_path / "student"
    flags = ["train", "--data", str(demo_data), "--out", str(student), *STUDENT, "--distill-from", str(ensemble)]
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", save_then_interrupt)
        assert main(flags) == 130
    targets = (student / RunDir.DISTILL_TARGETS).read_bytes()
    assert main(["train", "--resume", str(student)]) == 0
    assert computed == [1]  # computed once: the resumed run read them back
    assert (student / RunDir.DISTILL_TARGETS).read_bytes() == targets
    assert [json.loads(line)["epoch"] for line in (student / RunDir.METRICS).read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "damage", [b"garbage", "wrong shape", "nan"], ids=["not safetensors", "wrong shape", "not finite"]
)
def test_a_damaged_targets_cache_is_refused_in_one_line_on_resume(
    ensemble, demo_data, tmp_path, monkeypatch, capsys, damage
):
    from safetensors.torch import save_file

    from lowres_birds.train.state import Checkpointer

    save = Checkpointer.save

    def save_then_interrupt(self, state):
        save(self, state)
        raise KeyboardInterrupt

    student = tmp_path / "student"
    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    assert (
        main(["train", "--data", str(demo_data), "--out", str(student), *STUDENT, "--distill-from", str(ensemble)])
        == 130
    )
    monkeypatch.undo()
    path = student / RunDir.DISTILL_TARGETS
    if isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        logits = torch.zeros(5, 3) if damage == "wrong shape" else torch.full((30, 3), float("nan"))
        tensors = {"features": torch.zeros(len(logits), 0), "logits": logits}
        save_file({**tensors, "val_macro_f1": torch.tensor(0.5), "seconds": torch.tensor(1.0)}, str(path))
    capsys.readouterr()
    assert main(["train", "--resume", str(student)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "remove it and resume" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--distill-from", "no/such/folder"], "no/such/folder is not a trained run folder"),
        (["--kd-weight", "0"], "set kd_weight above 0 and feature_kd_weight 0"),
        (["--feature-kd-weight", "0.5"], "set kd_weight above 0 and feature_kd_weight 0"),
        (["--init-from", "no/such/run", "--no-student-from-teacher"], "init_from no/such/run: no model.safetensors"),
        (["--init-from", "{ensemble}/a", "--student-from-teacher"], "both choose the start weights"),
        (["--init-from", "{ensemble}/a", "--no-student-from-teacher", "--model", "efficientnet_lite0"], "do not fit"),
        (
            ["--init-from", "{ensemble}/a", "--no-student-from-teacher", "--kd-weight", "0", "--data", "{other}"],
            "trained on other classes",
        ),
    ],
    ids=[
        "no such folder",
        "no kd weight",
        "feature kd",
        "no start run",
        "two starts",
        "start misfits",
        "start classes",
    ],
)
def test_bad_distillation_settings_are_one_line_before_anything_trains(
    ensemble, demo_data, tmp_path, capsys, extra, message
):
    from lowres_birds.data.demo import make_demo_dataset

    student = tmp_path / "student"
    other = (
        make_demo_dataset(tmp_path / "other", train_per_class=6, test_per_class=1, classes=4)
        if "{other}" in extra
        else ""
    )
    extra = [part.format(ensemble=ensemble, other=other) for part in extra]
    distill = [] if "--kd-weight" in extra and "--init-from" in extra else ["--distill-from", str(ensemble)]
    flags = ["train", "--data", str(demo_data), "--out", str(student), *STUDENT, *distill]
    assert main([*flags, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not student.exists()
