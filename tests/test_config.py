"""Recipes: inheritance through `base:`, overrides, and the saved resolved config."""

from __future__ import annotations

import pytest

from lowres_birds.config import load_config
from lowres_birds.errors import UserError
from lowres_birds.run_dir import RunDir


def test_base_recipe_is_inherited_and_overridden(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: cpu\nepochs: 3\nkd_weight: 0.5\n")
    cfg = load_config(str(child), {"lr": "0.01"})
    cpu = load_config("cpu")
    assert (cfg.epochs, cfg.kd_weight, cfg.lr) == (3, 0.5, 0.01)
    assert (cfg.model, cfg.strategy, cfg.freeze_blocks) == (cpu.model, cpu.strategy, cpu.freeze_blocks)


def test_base_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="nest too deeply"):
        load_config(str(tmp_path / "a.yaml"))


def test_a_base_resolves_beside_its_recipe_for_members_too_and_a_built_in_base_ignores_the_working_folder(
    tmp_path, monkeypatch
):
    from lowres_birds.config import load_members

    recipes, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    recipes.mkdir()
    elsewhere.mkdir()
    (recipes / "small.yaml").write_text("base: cpu\nepochs: 2\n")
    (recipes / "ens.yaml").write_text("members:\n  a: {base: small.yaml}\n  b: {base: small.yaml, seed: 7}\n")
    (recipes / "one.yaml").write_text("base: small.yaml\nlr: 0.002\n")
    (elsewhere / "cpu").write_text("epochs: 99\n")  # a stray file named like a built-in recipe
    monkeypatch.chdir(elsewhere)
    members = load_members(str(recipes / "ens.yaml")).members
    assert [cfg.epochs for cfg in members.values()] == [2, 2] and members["b"].seed == 7
    assert (load_config(str(recipes / "one.yaml")).epochs, load_config(str(recipes / "one.yaml")).lr) == (2, 0.002)
    assert load_config("cpu").epochs == 7 and load_members("cpu-best").members["lite1"].epochs == 7


@pytest.mark.parametrize(
    "content, message",
    [(b"epochs: \xff\xfe\n", "not UTF-8 text"), (b"members: 5\n", "is an ensemble: train it")],
)
def test_an_unreadable_recipe_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        load_config(str(path))
    assert "\n" not in str(error.value)


def test_cpu_best_is_an_ensemble_of_cpu_runs_on_two_backbones_and_two_sizes_and_each_member_round_trips(tmp_path):
    from lowres_birds.config import load_members
    from lowres_birds.train.teacher import shared_teacher_key

    recipe = load_members("cpu-best")
    members = recipe.members
    assert {cfg.model for cfg in members.values()} == {"efficientnet_lite0", "efficientnet_lite1"}
    assert {cfg.strategy for cfg in members.values()} == {"upscale:128", "upscale:160"}
    assert all(cfg.student_from_teacher == (cfg.model == "efficientnet_lite0") for cfg in members.values())
    assert len({cfg.seed for cfg in members.values()}) == len(members)  # each member its own seed
    # each lite0 member (they start from their teachers' weights) its own split and teacher; lite1 shares the first's
    lite0 = [cfg for cfg in members.values() if cfg.student_from_teacher]
    assert len({shared_teacher_key(cfg) for cfg in lite0}) == len(lite0)
    assert shared_teacher_key(members["lite1"]) == shared_teacher_key(members["lite0-160"])
    assert all(cfg.teacher == "finetuned" and cfg.kd_weight > 0 and cfg.budget_minutes > 0 for cfg in members.values())
    # the student: the first member's split, started from the lite0 members' mean weights (a soup of one model and
    # input size), BatchNorm recomputed at the end; the whole recipe within 50 minutes
    student, first = recipe.student, members["lite0-160"]
    assert (student.seed, student.model, student.strategy) == (first.seed, first.model, first.strategy)
    assert student.init_runs == ["lite0-160", "lite0-160-b"] and student.kd_weight > 0 and student.recompute_batchnorm
    assert all(
        (members[name].model, members[name].strategy) == (first.model, first.strategy) for name in student.init_runs
    )
    assert (recipe.ensemble, recipe.tta) == ("f1", "flip")
    assert sum(cfg.budget_minutes for cfg in [*members.values(), student]) <= 50
    for name, cfg in members.items():
        RunDir(tmp_path / name).write_config(cfg)
        assert RunDir(tmp_path / name).config() == cfg
