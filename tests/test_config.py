"""Recipes: inheritance through `base:`, overrides, and the saved resolved config."""

from __future__ import annotations

import pytest

from lowres_birds.config import load_config
from lowres_birds.run_dir import RunDir
from lowres_birds.errors import UserError


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


def test_cpu_best_extends_cpu_and_round_trips(tmp_path):
    cfg = load_config("cpu-best")
    assert cfg.model == "efficientnet_lite0" and cfg.kd_weight > 0 and cfg.hr_view_ratio > 0
    RunDir(tmp_path).write_config(cfg)
    assert RunDir(tmp_path).config() == cfg
