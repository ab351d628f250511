"""Ensemble recipes (``members:``): one config per member, each trained into OUT/<name>, resumable, predicted as one."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from lowres_birds.cli import main
from lowres_birds.config import load_config, load_members
from lowres_birds.errors import UserError
from lowres_birds.run_dir import MembersDir

TWO_MEMBERS = """
epochs: 1
strategy: native
pretrained: false
members:
  small:
    model: timm:test_efficientnet
  other:
    model: timm:test_efficientnet
    seed: 7
    hflip: true
"""


def write_recipe(tmp_path, text: str = TWO_MEMBERS):
    path = tmp_path / "ensemble.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_members_take_base_then_shared_keys_then_their_own_then_the_flags(tmp_path):
    path = write_recipe(
        tmp_path,
        "epochs: 3\nlr: 0.002\nmembers:\n  a: {base: cpu}\n  b: {base: cpu, model: efficientnet_lite2, lr: 0.003}\n",
    )
    members = load_members(str(path), {"seed": 5, "epochs": None}).members
    assert list(members) == ["a", "b"]
    assert members["a"].freeze_blocks == load_config("cpu").freeze_blocks  # from the member's base
    assert members["a"].epochs == members["b"].epochs == 3 and members["a"].lr == 0.002  # shared keys over the base
    # the member's own keys over the shared ones
    assert members["b"].model == "efficientnet_lite2" and members["b"].lr == 0.003
    assert members["a"].seed == members["b"].seed == 5  # flags over everything (neither member sets a seed)
    assert load_members("cpu") is None


def test_a_seed_flag_moves_every_seed_of_an_ensemble_recipe_by_one_amount():
    """``--seed`` draws the whole recipe again: cpu-best's members keep distinct seeds, lite1 keeps the first
    member's split (and so its teacher), the student its split; without the flag the recipe's own seeds."""
    recipe = load_members("cpu-best")
    moved = load_members("cpu-best", {"seed": "7"})
    seeds = {name: (cfg.seed, cfg.split_seed_used) for name, cfg in moved.members.items()}
    assert {name: (cfg.seed, cfg.split_seed_used) for name, cfg in recipe.members.items()} == {
        "lite0-160": (42, 42),
        "lite0-160-b": (43, 43),
        "lite1": (45, 42),
    }
    assert seeds == {"lite0-160": (7, 7), "lite0-160-b": (8, 8), "lite1": (10, 7)}
    assert (recipe.student.seed, moved.student.seed, moved.student.split_seed_used) == (42, 7, 7)
    assert moved.members["lite1"].epochs == recipe.members["lite1"].epochs  # nothing else moves
    # cpu-best's runs keep their best validation's weights, as it was measured; cpu its last epoch's
    assert {cfg.keep for cfg in [*recipe.members.values(), recipe.student]} == {"best"}
    assert load_config("cpu").keep == "last"
    with pytest.raises(UserError, match="--seed must be between 0 and 4294967295"):
        load_members("cpu-best", {"seed": -1})


def test_a_seed_flag_that_would_move_a_members_seed_below_0_is_one_line(tmp_path):
    path = write_recipe(tmp_path, "members:\n  a: {base: cpu}\n  b: {base: cpu, seed: 7}\n")
    with pytest.raises(UserError) as refused:
        load_members(str(path), {"seed": 5})
    assert str(refused.value) == (
        f"--seed 5 moves recipe {path}, member b's seeds below 0 (each keeps its distance from the first member's 42); "
        "pass --seed 35 or more"
    )
    assert {name: cfg.seed for name, cfg in load_members(str(path), {"seed": 35}).members.items()} == {"a": 35, "b": 0}


@pytest.mark.parametrize(
    "text, message",
    [
        ("members: [a, b]\n", "members must map member names to their recipe keys"),
        ("members: {}\n", "members must map member names to their recipe keys"),
        ("members:\n  ../up: {epochs: 1}\n", "must be a folder name"),
        ("members:\n  a: {epochs: 0}\n", "member a"),
        ("members:\n  a: {colour: red}\n", "unknown key(s) colour"),
        ("members:\n  student: {epochs: 1}\n", "other than student"),
        ("ensemble: median\nmembers:\n  a: {epochs: 1}\n", "ensemble must be one of mean, f1"),
        ("tta: rotate\nmembers:\n  a: {epochs: 1}\n", "tta must be one of none, flip"),
        ("members:\n  a: {epochs: 1}\nstudent: [1]\n", "student must map recipe keys"),
        ("members:\n  a: {epochs: 1}\nstudent: {distill_from: x}\n", "without distill_from"),
        ("members:\n  a: {epochs: 1}\nstudent: {epochs: -1}\n", "student: epochs"),
        ("members:\n  a: {epochs: 1}\nstudent: {init_from: a, student_from_teacher: true}\n", "both choose"),
    ],
)
def test_bad_member_declarations_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UserError) as error:
        load_members(str(write_recipe(tmp_path, text)))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "where",
    [
        "members:\n  a: {epochs: 1}\n  b: {model: efficientnet_lite1}\n",
        "members:\n  a: {epochs: 1}\nstudent: {model: efficientnet_lite2}\n",
        "members:\n  a: {teacher_model: efficientnet_lite1, kd_weight: 0.5}\n",
    ],
)
def test_a_missing_extra_of_any_run_is_refused_before_the_first_member_trains(
    demo_data, tmp_path, monkeypatch, capsys, where
):
    import lowres_birds.extras

    real = lowres_birds.extras.find_spec
    monkeypatch.setattr(lowres_birds.extras, "find_spec", lambda name: None if "lite1" in name else real(name))
    out = tmp_path / "ens"
    recipe = write_recipe(tmp_path, "epochs: 1\nteacher: finetuned\nteacher_epochs: 1\n" + where)
    assert main(["train", "--data", str(demo_data), "--recipe", str(recipe), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "needs the [lite] extra" in error and "\n" not in error and not out.exists()


@pytest.mark.parametrize("runs", ["members", "folds"])
def test_a_model_the_hub_cannot_give_is_refused_before_the_first_run_trains(
    demo_data, tmp_path, monkeypatch, capsys, runs
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    if runs == "members":  # the second member's weights are on the Hub only
        recipe = write_recipe(tmp_path, "epochs: 1\nmembers:\n  a: {epochs: 1}\n  b: {model: 'timm:resnet18'}\n")
        argv = ["--recipe", str(recipe)]
    else:
        argv = ["--folds", "2", "--model", "timm:resnet18", "--epochs", "1"]
    assert main(["train", "--data", str(demo_data), "--out", str(out), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert "'timm:resnet18' is not in the Hugging Face cache" in error and "\n" not in error and not out.exists()


def test_a_model_id_of_no_known_kind_is_refused_before_the_first_member_trains(demo_data, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, "epochs: 1\nmembers:\n  a: {epochs: 1}\n  b: {model: resnet50}\n")
    assert main(["train", "--data", str(demo_data), "--out", str(out), "--recipe", str(recipe)]) == 2
    error = capsys.readouterr().err.strip()
    assert "unknown model 'resnet50'" in error and "timm:<name>" in error and "\n" not in error and not out.exists()


def test_an_ensemble_recipe_is_not_a_single_config(tmp_path):
    with pytest.raises(UserError, match="is an ensemble of 2 members"):
        load_config(str(write_recipe(tmp_path)))


def test_an_ensemble_trains_every_member_then_predicts_as_one_and_resumes_only_what_is_missing(
    demo_data, tmp_path, capsys
):
    out = tmp_path / "ensemble"
    flags = ["--device", "cpu"]
    assert (
        main(["train", "--recipe", str(write_recipe(tmp_path)), "--data", str(demo_data), "--out", str(out), *flags])
        == 0
    )
    assert "ensemble of 2 trained" in capsys.readouterr().out
    summary = MembersDir(out).summary()
    assert list(summary["members"]) == ["small", "other"] and set(summary["val_macro_f1"]) == {"small", "other"}
    assert summary["members"]["other"]["seed"] == 7 and summary["members"]["small"]["seed"] == 42
    assert (out / "small" / "model.safetensors").is_file() and (out / "other" / "model.safetensors").is_file()

    submission = tmp_path / "submission.csv"
    assert (
        main(["predict", "--run", str(out), "--ensemble", "f1", "--data", str(demo_data), "--out", str(submission)])
        == 0
    )
    assert "ensemble of 2 (weighted by validation macro-F1)" in capsys.readouterr().out
    assert list(pd.read_csv(submission)["id"]) == list(pd.read_csv(demo_data / "sample_submission.csv")["id"])

    # As if stopped before the second member finished: resume trains it and leaves the first alone.
    first = (out / "small" / "model.safetensors").stat().st_mtime_ns
    summary["val_macro_f1"].pop("other")
    MembersDir(out).write_summary(summary)
    # predict refuses an unfinished ensemble in one line
    assert main(["predict", "--run", str(out), "--data", str(demo_data), "--out", str(tmp_path / "s2.csv")]) == 2
    assert "has not finished training; continue with: lowres-birds train --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--print-config"]) == 0  # prints the saved configs, trains nothing
    printed = capsys.readouterr().out
    assert printed.startswith("# ensemble: mean, tta: none\n# member small\n") and "# member other\n" in printed
    assert "seed: 7\n" in printed and "other" not in MembersDir(out).summary()["val_macro_f1"]
    assert main(["train", "--resume", str(out)]) == 0
    assert "ensemble member other (2 of 2)" in capsys.readouterr().out
    assert (out / "small" / "model.safetensors").stat().st_mtime_ns == first
    assert set(MembersDir(out).summary()["val_macro_f1"]) == {"small", "other"}
    # a recorded member whose weights are gone is trained again, not reported as trained
    (out / "other" / "model.safetensors").unlink()
    assert main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "other has no model.safetensors: trained again" in printed and "ensemble member other" in printed
    assert (out / "other" / "model.safetensors").is_file()
    assert (out / "small" / "model.safetensors").stat().st_mtime_ns == first


@pytest.mark.parametrize(
    "damage",
    [
        "not json",
        json.dumps({"members": {}}),
        json.dumps({"data": "x", "members": {"a": {}}, "val_macro_f1": {"b": 1}}),
    ],
)
def test_a_damaged_ensemble_summary_is_one_line(tmp_path, damage):
    (tmp_path / MembersDir.SUMMARY).write_text(damage, encoding="utf-8")
    with pytest.raises(UserError) as error:
        MembersDir(tmp_path).runs()
    assert "ensemble.json" in str(error.value) and "\n" not in str(error.value)


SHARED_TEACHER = """
epochs: 1
strategy: native
pretrained: false
model: timm:test_efficientnet
teacher: finetuned
teacher_epochs: 1
teacher_size: 64
kd_weight: 0.7
split_seed: 5
members:
  first:
    seed: 1
  same-split:
    seed: 2
  other-size:
    seed: 3
    teacher_size: 48
"""


def test_members_on_one_split_share_one_fine_tuned_teacher(demo_data, tmp_path, capsys):
    out = tmp_path / "ensemble"
    assert (
        main(
            [
                "train",
                "--recipe",
                str(write_recipe(tmp_path, SHARED_TEACHER)),
                "--data",
                str(demo_data),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    targets = {
        name: (out / name / "teacher" / "targets.safetensors").read_bytes()
        for name in ("first", "same-split", "other-size")
    }
    assert targets["same-split"] == targets["first"] != targets["other-size"]  # copied, not trained again
    assert f"shared with {out / 'first' / 'teacher'}" in printed and printed.count("shared with") == 1
    splits = {name: json.loads((out / name / "split.json").read_text())["val_ids"] for name in targets}
    assert splits["first"] == splits["same-split"] == splits["other-size"]  # split_seed, not the members' seeds
    assert "\nseed: 2\n" in (out / "same-split" / "config.yaml").read_text()

    # A member retrained on resume copies the teacher of a member that finished before.
    summary = MembersDir(out).summary()
    summary["val_macro_f1"].pop("same-split")
    MembersDir(out).write_summary(summary)
    shutil.rmtree(out / "same-split")
    assert main(["train", "--resume", str(out)]) == 0
    assert f"shared with {out / 'first' / 'teacher'}" in capsys.readouterr().out
    assert (out / "same-split" / "teacher" / "targets.safetensors").read_bytes() == targets["first"]


def test_a_split_seed_draws_the_split_and_the_seed_alone_does_when_unset(demo_data):
    from lowres_birds.train.data import load_training_data

    def val_rows(**overrides) -> list[int]:
        return sorted(
            load_training_data(demo_data, load_config("cpu", {"val_fraction": 0.3, **overrides})).val_idx.tolist()
        )

    assert val_rows(seed=1, split_seed=9) == val_rows(seed=2, split_seed=9) == val_rows(seed=9)
    assert val_rows(seed=1) != val_rows(seed=2) or val_rows(seed=1) != val_rows(seed=3)


WITH_STUDENT = (
    TWO_MEMBERS
    + """ensemble: f1
tta: flip
student:
  model: timm:test_efficientnet
  epochs: 2
  kd_weight: 0.7
  init_from: small, other
  lr: 1.0e-9
"""
)


def test_an_ensemble_recipe_ends_with_a_student_distilled_from_its_members_resumable(
    demo_data, tmp_path, capsys, monkeypatch
):
    from lowres_birds.run_dir import RunDir
    from lowres_birds.train.state import Checkpointer

    out = tmp_path / "ensemble"
    save = Checkpointer.save

    def save_then_interrupt(self, state):
        save(self, state)
        if self.run.path.name == "student" and state.epoch == 1:
            raise KeyboardInterrupt

    recipe = str(write_recipe(tmp_path, WITH_STUDENT))
    flags = ["train", "--recipe", recipe, "--data", str(demo_data), "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", save_then_interrupt)
        assert main([*flags, "--device", "cpu"]) == 130
    assert "the ensemble's student, distilled from its 2 members" in capsys.readouterr().out
    targets = (out / "student" / RunDir.DISTILL_TARGETS).read_bytes()
    assert main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ensemble member" not in printed and "weights f1, TTA flip" in printed
    summary = MembersDir(out).summary()
    assert (summary["ensemble"], summary["tta"]) == ("f1", "flip") and "student_val_macro_f1" in summary
    student = RunDir(out / "student")
    assert (student / RunDir.DISTILL_TARGETS).read_bytes() == targets  # computed once, read back on resume
    assert student.config().distill_from == str(out.resolve())
    assert student.config().init_from == f"{(out / 'small').resolve()},{(out / 'other').resolve()}"
    assert [r["epoch"] for r in student.metrics()] == [1, 2]
    # started from the members' mean weights (lr 1e-9: still it), and a run folder like any other (HF folder, report)
    first, second = RunDir(out / "small").weights(), RunDir(out / "other").weights()
    weights = student.weights().items()
    kept = [
        torch.allclose((first[k] + second[k]) / 2, v, atol=1e-5)
        for k, v in weights
        if v.is_floating_point() and "bn" not in k
    ]
    assert kept and all(kept)
    assert (student / RunDir.HF / "README.md").is_file() and (student / "report" / "report.html").is_file()
    assert MembersDir(out).runs() == [out / "small", out / "other"]  # the student is not a member
