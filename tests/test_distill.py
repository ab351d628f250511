"""Distillation from trained models (--distill-from): the ensemble's flip-TTA probabilities on every training image,
computed once into the student's run folder, validated when read back, reused on resume; or (--distill-targets
online) the models' answers on every augmented batch the student sees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAIN

from lowres_birds.cli import main
from lowres_birds.data.splits import run_split
from lowres_birds.errors import UserError
from lowres_birds.model.calibration import KEEP_KNOWN
from lowres_birds.predict.calibrate import held_out_fit
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
    from lowres_birds.predict.classifier import Classifier, average_predictions, resolve_ensemble

    student = tmp_path / "student"
    assert (
        main(["train", "--data", str(demo_data), "--out", str(student), *STUDENT, "--distill-from", str(ensemble)]) == 0
    )
    assert f"distilling from {ensemble} (2 runs" in capsys.readouterr().out
    saved = RunDir(student).teacher_targets(30, 3, "x", name=RunDir.DISTILL_TARGETS, with_features=False)
    members, weights = resolve_ensemble([ensemble], "f1")
    images = load_images(load_train_table(demo_data).lr_paths, 64)
    expected = average_predictions([Classifier.load(m) for m in members], images, "flip", weights).probs
    np.testing.assert_allclose(saved["logits"].exp().numpy(), expected, atol=1e-5)  # as predict --tta flip
    assert saved["features"] is None and RunDir(student).config().distill_from == str(ensemble)
    # The model card and the report name the models it learned from, their scores and the student's.
    for page in (student / "hf" / "README.md", student / "report" / "report.html"):
        text = page.read_text(encoding="utf-8")
        assert f"distilled from {ensemble}: 2 run(s)" in text and "this student " in text, page


def test_unlabelled_photos_train_with_the_models_answers_as_targets_and_labels(
    ensemble, demo_data, tmp_path, monkeypatch, capsys
):
    import lowres_birds.train.session as session
    from lowres_birds.data.images import load_images
    from lowres_birds.data.tables import find_images
    from lowres_birds.predict.classifier import Classifier, average_predictions, resolve_ensemble

    photos = find_images(demo_data / "test")  # 18 photos without labels
    trained_on = []
    make_loader = session.make_loader
    monkeypatch.setattr(
        session, "make_loader", lambda *a, **k: trained_on.append((a[1].copy(), a[2].copy())) or make_loader(*a, **k)
    )
    student = tmp_path / "student"
    flags = [*STUDENT, "--distill-from", str(ensemble), "--distill-images", str(demo_data / "test")]
    assert main(["train", "--data", str(demo_data), "--out", str(student), *flags]) == 0
    assert f"{27 + len(photos)} training ({len(photos)} of them unlabelled photos) / 3 validation" in (
        capsys.readouterr().out
    )
    saved = RunDir(student).teacher_targets(30 + len(photos), 3, "x", name=RunDir.DISTILL_TARGETS, with_features=False)
    members, weights = resolve_ensemble([ensemble], "f1")
    classifiers = [Classifier.load(m) for m in members]
    expected = average_predictions(classifiers, load_images(photos, 64), "flip", weights).probs
    np.testing.assert_allclose(saved["logits"][30:].exp().numpy(), expected, atol=1e-5)  # their soft targets
    (labels, rows), validation = trained_on[0], run_split(RunDir(student)).val_rows
    assert list(rows[-len(photos) :]) == list(range(30, 30 + len(photos)))  # in training, never in validation
    assert np.array_equal(labels[30:], expected.argmax(1)) and len(validation) == 3  # the models' top class
    card = (student / "hf" / "README.md").read_text(encoding="utf-8")
    assert f"2 run(s) (flip TTA; also on the unlabelled photos of {demo_data / 'test'}," in card


def test_distill_images_on_an_ensemble_recipe_goes_to_its_student_alone(tmp_path):
    from lowres_birds.config import load_members

    recipe = tmp_path / "r.yaml"
    recipe.write_text("members:\n  a: {epochs: 1}\nstudent: {epochs: 1}\n")
    members = load_members(str(recipe), {"distill_images": "photos"})
    assert members.members["a"].distill_images == ""
    assert members.student.distill_images == str((Path.cwd() / "photos").absolute())
    recipe.write_text("members:\n  a: {epochs: 1}\n")
    with pytest.raises(UserError, match="has no student to distil"):
        load_members(str(recipe), {"distill_images": "photos"})


def interrupted_after_epoch_1(monkeypatch, flags: list[str]) -> int:
    """``main(flags)`` stopped by Ctrl-C right after epoch 1's checkpoint: its exit code."""
    from lowres_birds.train.state import Checkpointer

    save = Checkpointer.save

    def save_then_interrupt(self, state):
        save(self, state)
        if state.epoch == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", save_then_interrupt)
        return main(flags)


def test_an_interrupted_distillation_resumes_with_its_cached_targets(ensemble, demo_data, tmp_path, monkeypatch):
    import lowres_birds.train.teacher as teacher

    computed = []
    probabilities = teacher.ensemble_probabilities
    monkeypatch.setattr(teacher, "ensemble_probabilities", lambda *a, **k: computed.append(1) or probabilities(*a, **k))
    student = tmp_path / "student"
    flags = ["train", "--data", str(demo_data), "--out", str(student), *STUDENT, "--distill-from", str(ensemble)]
    assert interrupted_after_epoch_1(monkeypatch, flags) == 130
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
        (["--distill-targets", "online", "--distill-from", ""], "distill_targets online needs distill_from"),
        (["--distill-targets", "sometimes"], "sometimes"),
        (["--feature-kd-weight", "0.5"], "set kd_weight above 0 and feature_kd_weight 0"),
        (["--init-from", "no/such/run", "--no-student-from-teacher"], "init_from no/such/run: no model.safetensors"),
        (["--init-from", "{ensemble}/a", "--student-from-teacher"], "both choose the start weights"),
        (["--init-from", "{ensemble}/a", "--no-student-from-teacher", "--model", "efficientnet_lite0"], "do not fit"),
        (
            ["--init-from", "{ensemble}/a", "--no-student-from-teacher", "--kd-weight", "0", "--data", "{other}"],
            "trained on other classes",
        ),
        (["--init-from", "{ensemble}/a,no/such/run", "--no-student-from-teacher"], "init_from no/such/run: no model"),
        (["--init-from", "{ensemble}/a,{misfit}", "--no-student-from-teacher"], "holds another model than"),
        (["--distill-images", "no/such/photos"], "no/such/photos not found"),
        (["--distill-images", "{empty}"], "no images"),
        (["--distill-images", "{broken}"], "broken.jpg"),
        (["--distill-images", "{photos}", "--distill-from", ""], "set --distill-from, or drop --distill-images"),
        (["--distill-images", "{photos}", "--strategy", "hr-downscale:64"], "those photos have no high-res twins"),
    ],
    ids=[
        "no such folder",
        "no kd weight",
        "online without models",
        "no such mode",
        "feature kd",
        "no start run",
        "two starts",
        "start misfits",
        "start classes",
        "soup: no such run",
        "soup: another model",
        "unlabelled: no such folder",
        "unlabelled: no images",
        "unlabelled: a broken image",
        "unlabelled: no models",
        "unlabelled: HR strategy",
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
    misfit = tmp_path / "misfit"
    if any("{misfit}" in part for part in extra):  # a run of another model: one weight fewer
        from safetensors.torch import save_file

        shutil.copytree(ensemble / "a", misfit)
        weights = RunDir(misfit).weights()
        save_file(dict(list(weights.items())[1:]), str(misfit / RunDir.WEIGHTS))
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.jpg").write_bytes(b"not a jpeg")
    places = {"empty": tmp_path / "empty", "broken": tmp_path / "broken", "photos": demo_data / "test"}
    extra = [part.format(ensemble=ensemble, other=other, misfit=misfit, **places) for part in extra]
    distill = [] if "--kd-weight" in extra and "--init-from" in extra else ["--distill-from", str(ensemble)]
    flags = ["train", "--data", str(demo_data), "--out", str(student), *STUDENT, *distill]
    assert main([*flags, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not student.exists()


def test_init_from_several_runs_starts_from_the_mean_of_their_weights(ensemble, demo_data, tmp_path, capsys):
    student = tmp_path / "student"
    flags = ["--distill-from", str(ensemble), "--init-from", f"{ensemble / 'a'}, {ensemble / 'b'}", "--lr", "1e-9"]
    args = ["train", "--data", str(demo_data), "--out", str(student), *STUDENT, "--no-student-from-teacher", *flags]
    assert main(args) == 0
    first, second = RunDir(ensemble / "a").weights(), RunDir(ensemble / "b").weights()
    learned = {k: v for k, v in RunDir(student).weights().items() if v.is_floating_point() and "bn" not in k}
    assert learned and not torch.allclose(first["backbone.conv_stem.weight"], second["backbone.conv_stem.weight"])
    for name, value in learned.items():  # lr 1e-9: still the mean of the two runs' weights (a model soup)
        torch.testing.assert_close(value, (first[name] + second[name]) / 2, atol=1e-5, rtol=0)
    # a and b trained on most of the student's validation images: its temperature is the mean of theirs, and its
    # threshold keeps as many of them as a and b keep at the thresholds each sets on its own split
    calibration = json.loads((student / "calibration.json").read_text())
    starts = [ensemble / "a", ensemble / "b"]
    assert calibration["temperature_from"] == [str(run) for run in starts]
    split = run_split(RunDir(student))
    images = split.lr_images(split.val_rows)
    fits = [held_out_fit(RunDir(run), None, "none", "mahalanobis", images) for run in starts]
    assert calibration["temperature"] == pytest.approx(sum(t for t, _ in fits) / 2) and fits[0][0] != fits[1][0]
    assert calibration["keep_known"] == pytest.approx(sum(kept for _, kept in fits) / 2)
    assert all(0 < kept <= 1 for _, kept in fits) and calibration["keep_known"] != pytest.approx(KEEP_KNOWN)
    report = (student / "report" / "report.html").read_text()
    assert f"keeps {calibration['keep_known']:.1%} of the validation images" in report
    assert "the share its starting runs keep at their own" in report
    # starting runs no longer found cannot be checked: said in one line, the temperature fitted on its own split
    moved = tmp_path / "moved"
    shutil.copytree(student, moved)
    config = moved / "config.yaml"
    config.write_text(config.read_text().replace(str(ensemble / "a"), str(tmp_path / "gone")))
    assert main(["calibrate", "--run", str(moved)]) == 0
    assert "gone, which is not found" in capsys.readouterr().err
    refitted = json.loads((moved / "calibration.json").read_text())
    assert "temperature_from" not in refitted and refitted["temperature"] != pytest.approx(calibration["temperature"])


def test_a_run_started_from_one_on_its_own_split_fits_its_own_temperature(ensemble, demo_data, tmp_path):
    student = tmp_path / "student"
    flags = ["--init-from", str(ensemble / "a"), "--seed", "1", "--no-student-from-teacher"]  # a's seed: a's split
    assert main(["train", "--data", str(demo_data), "--out", str(student), *STUDENT, *flags]) == 0
    calibration = json.loads((student / "calibration.json").read_text())
    assert "temperature_from" not in calibration and calibration["keep_known"] == KEEP_KNOWN
    split = run_split(RunDir(student))
    images = split.lr_images(split.val_rows)
    temperature, kept = held_out_fit(RunDir(student), None, "none", "mahalanobis", images)
    assert calibration["temperature"] == pytest.approx(temperature)
    assert kept == pytest.approx(KEEP_KNOWN, abs=1 / len(images))  # its own threshold keeps 95 % of its own split


def test_online_targets_are_the_models_answers_on_the_very_batch_the_student_gets():
    from lowres_birds.config import load_config
    from lowres_birds.train.data import HRSupport, TeacherTargets, training_batch

    seen = []

    def answer(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.clone())
        return torch.tensor([0.7, 0.2, 0.1]).repeat(len(batch), 1)

    cfg = load_config(
        "cpu", {"mixup_alpha": 0.4, "kd_temperature": 2.0, "distill_from": "x", "distill_targets": "online"}
    )
    teacher = TeacherTargets(None, None, 0.9, "distilled", "stub", 0.0, answer=answer)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    batch, targets = training_batch(
        images, torch.tensor([0, 1, 2, 0]), torch.arange(4), 3, cfg, generator, HRSupport(teacher=teacher)
    )
    assert len(seen) == 1 and torch.equal(seen[0], batch)  # after crop, flip and MixUp: what the student sees
    assert not torch.equal(batch, images)
    expected = torch.tensor([0.7, 0.2, 0.1]).log().div(2.0).softmax(-1).repeat(4, 1)
    torch.testing.assert_close(targets.teacher_probs, expected)
    assert targets.labels.shape == (4, 3) and targets.teacher_features is None


def test_online_distillation_caches_nothing_says_so_and_resumes(ensemble, demo_data, tmp_path, monkeypatch, capsys):
    student = tmp_path / "student"
    flags = ["--data", str(demo_data), "--out", str(student), *STUDENT, "--distill-from", str(ensemble)]
    assert interrupted_after_epoch_1(monkeypatch, ["train", *flags, "--distill-targets", "online"]) == 130
    assert f"distilling from {ensemble} (2 runs, online on every augmented batch" in capsys.readouterr().out
    assert main(["train", "--resume", str(student)]) == 0
    assert not (student / RunDir.DISTILL_TARGETS).exists()
    assert RunDir(student).config().distill_targets == "online"
    assert [json.loads(line)["epoch"] for line in (student / RunDir.METRICS).read_text().splitlines()] == [1, 2]
    card = (student / "hf" / "README.md").read_text(encoding="utf-8")
    assert f"distilled from {ensemble}: 2 run(s) (online, weighted by validation macro-F1)" in card


def test_a_run_written_before_distill_images_existed_still_loads(ensemble, tmp_path):
    import yaml

    old = tmp_path / "old"
    shutil.copytree(ensemble / "a", old)
    config = yaml.safe_load((old / RunDir.CONFIG).read_text())
    (old / RunDir.CONFIG).write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "distill_images"}))
    assert RunDir(old).config().distill_images == ""  # what it did: no unlabelled photos
    (old / RunDir.CONFIG).write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "seed"}))
    with pytest.raises(UserError, match="lacks 1 of its .* keys \\(first: seed\\); the run folder is damaged"):
        RunDir(old).config()


def test_a_student_on_data_without_twins_keeps_its_distillation(ensemble, demo_data, tmp_path, capsys):
    import pandas as pd

    data = tmp_path / "data"
    shutil.copytree(demo_data, data, ignore=shutil.ignore_patterns("upscale_train"))
    pd.read_csv(demo_data / "train.csv").drop(columns=["upscale_img_path"]).to_csv(data / "train.csv", index=False)
    student = tmp_path / "student"
    flags = [*STUDENT, "--distill-from", str(ensemble), "--distill-images", str(data / "test")]
    assert main(["train", "--data", str(data), "--out", str(student), *flags]) == 0
    out = capsys.readouterr().out
    assert "no high-res twins (" in out and "HR teacher" not in out  # the distilled models need no twins
    assert f"distilling from {ensemble} (2 runs" in out and "(18 of them unlabelled photos)" in out
    assert RunDir(student).config().kd_weight == 0.7 and (student / RunDir.DISTILL_TARGETS).is_file()
