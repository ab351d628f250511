"""The fine-tuned HR teacher (``teacher: finetuned``): a run of its own in RUN/teacher, trained on the HR twins before
the student, whose logits and features are written once, validated when read back, and reused by a resumed run."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST_TRAIN

from lowres_birds.cli import main
from lowres_birds.config import load_config
from lowres_birds.errors import TrainingInterrupted, UserError
from lowres_birds.run_dir import RunDir, save_safetensors
from lowres_birds.train.session import open_run
from lowres_birds.train.teacher import teacher_config

FINETUNED = [
    *FAST_TRAIN,
    "--teacher",
    "finetuned",
    "--teacher-epochs",
    "1",
    "--teacher-size",
    "64",
    "--kd-weight",
    "0.7",
    "--feature-kd-weight",
    "1",
    "--mixup-alpha",
    "0.2",
    "--budget-minutes",
    "0",
]
ROWS, CLASSES = 30, 3  # the demo_data fixture: 3 species x 10 training images


@pytest.fixture(scope="module")
def finetuned_run(demo_data, tmp_path_factory) -> tuple[Path, str]:
    """A student distilled from a fine-tuned teacher, and what its training printed."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--data", str(demo_data), "--out", str(run), *FINETUNED]) == 0
    return run, printed.getvalue()


def stop_before_last_epoch(run: Path) -> None:
    """The run as if stopped when its last epoch began (--resume refuses a finished run): the checkpoint's state
    and metrics.jsonl rewound by one epoch."""
    path = run / RunDir.CHECKPOINT
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    epoch = checkpoint["state"]["epoch"] - 1
    checkpoint["state"].update(epoch=epoch, step_in_epoch=0)
    torch.save(checkpoint, path)
    lines = (run / RunDir.METRICS).read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if json.loads(line)["epoch"] <= epoch]
    (run / RunDir.METRICS).write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def mtimes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir() if path.is_file()}


def test_the_teacher_config_keeps_split_and_optimiser_and_drops_the_students_distillation():
    student = load_config(
        "cpu",
        {
            "teacher": "finetuned",
            "teacher_model": "efficientnet_lite2",
            "teacher_size": 192,
            "teacher_epochs": 3,
            "kd_weight": 0.7,
            "feature_kd_weight": 1.0,
            "mixup_alpha": 0.2,
            "hr_view_ratio": 0.5,
            "folds": 5,
            "fold": 2,
            "teacher_budget_share": 0.6,
        },
    )
    teacher = teacher_config(student)
    assert (teacher.model, teacher.strategy, teacher.epochs) == ("efficientnet_lite2", "hr-downscale:192", 3)
    assert (teacher.seed, teacher.folds, teacher.fold, teacher.val_fraction) == (
        student.seed,
        5,
        2,
        student.val_fraction,
    )
    assert (teacher.lr, teacher.weight_decay, teacher.schedule, teacher.batch_size) == (
        student.lr,
        student.weight_decay,
        student.schedule,
        student.batch_size,
    )
    assert (teacher.kd_weight, teacher.feature_kd_weight, teacher.mixup_alpha, teacher.hr_view_ratio) == (0, 0, 0, 0)
    assert teacher.teacher == "frozen" and teacher.budget_minutes == pytest.approx(student.budget_minutes * 0.6)
    assert teacher.budget_minutes > 0  # the teacher plans its epochs in its share of the run's budget


def test_the_teacher_is_a_complete_run_and_its_targets_fit_the_data(finetuned_run):
    run, printed = finetuned_run
    teacher = RunDir(run / RunDir.TEACHER)
    cfg = teacher.config()
    assert (cfg.strategy, cfg.epochs, cfg.kd_weight, cfg.model) == ("hr-downscale:64", 1, 0, "timm:test_efficientnet")
    assert [record["epoch"] for record in teacher.metrics()] == [1]
    # the student's validation images are the teacher's too
    assert teacher.split()["val_ids"] == RunDir(run).split()["val_ids"]
    assert (
        main(
            ["predict-image", "--run", str(teacher.path), str(next((Path(teacher.split()["data"]) / "test").iterdir()))]
        )
        == 0
    )
    targets = teacher.teacher_targets(ROWS, CLASSES, damaged="test")
    # test_efficientnet's width
    assert targets["logits"].shape == (ROWS, CLASSES) and targets["features"].shape == (
        ROWS,
        256,
    )
    line = next(line for line in printed.splitlines() if line.startswith("HR teacher"))
    assert "finetuned" in line and "val macro-F1 on HR twins" in line and "took" in line
    student = RunDir(run)
    assert student.config().teacher == "finetuned" and [record["epoch"] for record in student.metrics()] == [1]
    assert all(torch.isfinite(torch.tensor(record["train_loss"])) for record in student.metrics())
    seconds = teacher.teacher_targets(ROWS, CLASSES, damaged="test")["seconds"]
    # the run's clock (and time budget) counts its teacher's training
    assert student.metrics()[0]["elapsed_s"] > seconds > 0


def test_a_resumed_run_reuses_the_finished_teacher(finetuned_run, capsys):
    run, _ = finetuned_run
    before = mtimes(run / RunDir.TEACHER)
    stop_before_last_epoch(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert mtimes(run / RunDir.TEACHER) == before
    assert "reused" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("HR teacher"))


@pytest.mark.parametrize("damage", ["garbage", "shape"])
def test_damaged_targets_are_computed_again_without_retraining_the_teacher(finetuned_run, capsys, damage):
    run, _ = finetuned_run
    teacher = run / RunDir.TEACHER
    targets = teacher / RunDir.TEACHER_TARGETS
    if damage == "garbage":
        targets.write_bytes(b"not a safetensors file")
    else:
        save_safetensors(
            targets,
            {
                "features": torch.zeros(ROWS - 1, 256),
                "logits": torch.zeros(ROWS - 1, CLASSES),
                "val_macro_f1": torch.tensor(0.5),
                "seconds": torch.tensor(1.0),
            },
        )
    weights = (teacher / RunDir.WEIGHTS).stat().st_mtime_ns
    stop_before_last_epoch(run)
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{targets}" in out and "computing them again" in out and "Traceback" not in out
    assert (teacher / RunDir.WEIGHTS).stat().st_mtime_ns == weights  # not retrained
    assert RunDir(teacher).teacher_targets(ROWS, CLASSES, damaged="test")["logits"].shape == (ROWS, CLASSES)


@pytest.mark.parametrize(
    "tamper, expected",
    [
        ({"logits": torch.zeros(ROWS, CLASSES + 1)}, "logits"),
        ({"features": torch.zeros(ROWS)}, "features"),
        ({"features": torch.full((ROWS, 8), float("nan"))}, "not finite"),
        ({"val_macro_f1": torch.tensor(2.0)}, "macro-F1"),
        ({"seconds": None}, "lacks"),
    ],
)
def test_the_targets_reader_refuses_what_does_not_fit_in_one_line(tmp_path, tamper, expected):
    tensors = {
        "features": torch.zeros(ROWS, 8),
        "logits": torch.zeros(ROWS, CLASSES),
        "val_macro_f1": torch.tensor(0.5),
        "seconds": torch.tensor(1.0),
    }
    tensors = {key: value for key, value in {**tensors, **tamper}.items() if value is not None}
    save_safetensors(tmp_path / RunDir.TEACHER_TARGETS, tensors)
    with pytest.raises(UserError, match=expected) as error:
        RunDir(tmp_path).teacher_targets(ROWS, CLASSES, damaged="do this")
    assert (
        str(tmp_path / RunDir.TEACHER_TARGETS) in str(error.value)
        and str(error.value).endswith("do this")
        and "\n" not in str(error.value)
    )


def test_an_unfinished_teacher_is_resumed_from_its_checkpoint(finetuned_run, tmp_path, capsys):
    """A teacher stopped after epoch 1 of 2 (the run's config asks for 2; no targets, no student checkpoint yet)."""
    run = tmp_path / "run"
    shutil.copytree(finetuned_run[0], run)
    config = yaml.safe_load((run / RunDir.CONFIG).read_text())
    (run / RunDir.CONFIG).write_text(yaml.safe_dump({**config, "teacher_epochs": 2}, sort_keys=False))
    for stale in (run / RunDir.CHECKPOINT, run / RunDir.METRICS, run / RunDir.TEACHER / RunDir.TEACHER_TARGETS):
        stale.unlink()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"resumed {run / RunDir.TEACHER} at epoch 2" in out
    assert [record["epoch"] for record in RunDir(run / RunDir.TEACHER).metrics()] == [1, 2]
    assert [json.loads(line)["epoch"] for line in (run / RunDir.METRICS).read_text().splitlines()] == [1]


def test_a_teacher_with_another_feature_width_is_refused_for_feature_kd_before_training(demo_data, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [*FINETUNED, "--teacher-model", "timm:test_resnet"]  # 96 features; the student's test_efficientnet has 256
    assert main(["train", "--data", str(demo_data), "--out", str(run), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--feature-kd-weight 0" in err and "96" in err and "256" in err
    assert not run.exists()


def test_a_teacher_stopped_by_a_signal_says_to_resume_the_whole_run(demo_data, tmp_path, monkeypatch):
    import lowres_birds.train.loop as loop

    cfg = load_config(
        "cpu", {"teacher": "finetuned", "kd_weight": 0.7, "model": "timm:test_efficientnet", "pretrained": False}
    )
    opened = open_run(cfg, demo_data, tmp_path / "run")

    def stopped(*_args, **_kwargs):
        raise TrainingInterrupted(
            "SIGINT: checkpoint saved at epoch 1, step 2; continue with: lowres-birds train --resume "
            f"{tmp_path / 'run' / 'teacher'}"
        )

    monkeypatch.setattr(loop, "train", stopped)  # the teacher's own run, trained by loop.train
    with pytest.raises(TrainingInterrupted) as stop:
        loop.hr_teacher(opened)
    assert str(stop.value) == (
        f"SIGINT: checkpoint saved at epoch 1, step 2 of the HR teacher in {tmp_path / 'run' / 'teacher'}; "
        f"continue with: lowres-birds train --resume {tmp_path / 'run'}"
    )


def test_each_fold_trains_its_own_teacher_on_its_own_split(demo_data, tmp_path):
    out = tmp_path / "folds"
    assert main(["train", "--data", str(demo_data), "--out", str(out), *FINETUNED, "--folds", "2"]) == 0
    for fold in ("fold0", "fold1"):
        student, teacher = RunDir(out / fold), RunDir(out / fold / RunDir.TEACHER)
        assert (teacher.config().folds, teacher.config().fold) == (2, int(fold[-1]))
        assert teacher.split()["val_ids"] == student.split()["val_ids"]
    assert RunDir(out / "fold0").split()["val_ids"] != RunDir(out / "fold1").split()["val_ids"]


def test_data_without_twins_trains_the_recipe_without_its_teacher_and_says_so(demo_data, tmp_path, capsys):
    import shutil

    import pandas as pd

    data = tmp_path / "data"
    shutil.copytree(demo_data, data, ignore=shutil.ignore_patterns("upscale_train"))
    table = pd.read_csv(data / "train.csv").drop(columns=["upscale_img_path"])
    table.to_csv(data / "train.csv", index=False)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                *FAST_TRAIN,
                "--kd-weight",
                "0.7",
                "--teacher",
                "finetuned",
            ]
        )
        == 0
    )
    assert "no high-res twins (" in capsys.readouterr().out
    cfg = RunDir(run).config()
    # the saved config is what ran
    assert (cfg.kd_weight, cfg.teacher) == (0, "frozen") and not (run / RunDir.TEACHER).exists()


@pytest.mark.parametrize("from_teacher", [True, False])
def test_student_from_teacher_starts_the_student_from_the_teachers_best_weights(finetuned_run, tmp_path, from_teacher):
    """A student that barely moves (lr 1e-9) ends where it started: at the teacher's weights with the flag, else not."""
    run = tmp_path / "run"
    shutil.copytree(finetuned_run[0], run)
    config = yaml.safe_load((run / RunDir.CONFIG).read_text())
    (run / RunDir.CONFIG).write_text(
        yaml.safe_dump({**config, "student_from_teacher": from_teacher, "lr": 1e-9}, sort_keys=False)
    )
    for stale in (run / RunDir.CHECKPOINT, run / RunDir.METRICS, run / RunDir.WEIGHTS):
        stale.unlink()
    teacher = RunDir(run / RunDir.TEACHER)
    marked = {
        name: tensor + 0.5 if name.endswith("conv_stem.weight") else tensor
        for name, tensor in teacher.weights().items()
    }
    teacher.save_weights(marked)  # a teacher no initialisation could give
    assert main(["train", "--resume", str(run)]) == 0
    student = RunDir(run).weights()
    stem = next(name for name in student if name.endswith("conv_stem.weight"))
    assert torch.allclose(student[stem], marked[stem], atol=1e-5) is from_teacher


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--teacher", "frozen"], "teacher frozen"),
        (
            ["--teacher-model", "timm:test_resnet", "--feature-kd-weight", "0", "--freeze-blocks", "0"],
            "model timm:test_resnet",
        ),
        (["--kd-weight", "0", "--feature-kd-weight", "0"], "kd weights 0/0"),
    ],
)
def test_student_from_teacher_without_a_finetuned_teacher_of_its_model_starts_as_usual_and_says_why(
    demo_data, tmp_path, capsys, flags, says
):
    run = tmp_path / "run"
    assert (
        main(["train", "--data", str(demo_data), "--out", str(run), *FINETUNED, "--student-from-teacher", *flags]) == 0
    )
    notice = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("student_from_teacher:"))
    assert says in notice and "starts from random weights" in notice  # FAST_TRAIN's --no-pretrained
    assert RunDir(run).config().student_from_teacher is False  # the run folder records what it did


def test_teacher_weights_that_do_not_fit_the_student_are_refused_in_one_line(tmp_path):
    from lowres_birds.model.factory import create_model
    from lowres_birds.train.teacher import start_from_teacher

    teacher = RunDir(tmp_path / RunDir.TEACHER)
    teacher.path.mkdir()
    teacher.save_weights(
        create_model("timm:test_efficientnet", ["a", "b", "c", "d"], 64, pretrained=False).state_dict()
    )
    with pytest.raises(UserError, match="do not fit the student") as error:
        start_from_teacher(
            create_model("timm:test_efficientnet", ["a", "b", "c"], 64, pretrained=False), RunDir(tmp_path)
        )
    assert str(teacher / RunDir.WEIGHTS) in str(error.value) and "\n" not in str(error.value)
