"""study: one run per strategy on one split, one table row each, reuse on rerun; recipes compared alike."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lowres_birds.cli import main
from lowres_birds.errors import UserError
from lowres_birds.inspect.study import plan_runs

TINY = ["--model", "efficientnet_lite0", "--epochs", "1", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def study_out(demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    assert (
        main(
            [
                "study",
                "--data",
                str(demo_data),
                "--strategies",
                "native,upscale:80",
                "--budget-minutes",
                "3",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    return out


def test_one_row_per_strategy_with_reference_numbers_beside(study_out):
    table = pd.read_csv(study_out / "results.csv")
    assert table["strategy"].tolist() == ["native", "upscale:80"]
    assert table["model input"].tolist() == ["64x64", "80x80"]
    assert table["budget (min)"].astype(str).tolist() == ["3", "3"]
    assert table["reference macro-F1 (BEiT, private test)"].iloc[0] == 0.85  # the reference's native score
    assert table["reference macro-F1 (BEiT, private test)"].isna().iloc[1]  # no reference run at 80
    assert table["val macro-F1"].between(0, 1).all() and (table["images/s"] > 0).all()
    markdown = (study_out / "results.md").read_text(encoding="utf-8")
    assert markdown.count("\n| cpu |") == 2 and "share the validation split" in markdown


def test_every_run_shares_the_validation_split(study_out):
    splits = [json.loads((study_out / name / "split.json").read_text())["val_ids"] for name in ("native", "upscale-80")]
    assert splits[0] == splits[1]


def test_page_and_chart_are_written(study_out):
    assert (study_out / "results.png").stat().st_size > 1000
    page = (study_out / "study.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1 and "upscale:80" in page


def test_rerun_reuses_finished_runs(study_out, demo_data, capsys):
    assert (
        main(
            [
                "study",
                "--data",
                str(demo_data),
                "--strategies",
                "native,upscale:80",
                "--budget-minutes",
                "3",
                "--out",
                str(study_out),
                *TINY,
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("reused") == 2


def test_recipes_are_compared_on_one_split(tmp_path):
    for name, lr in (("slow", 1e-4), ("fast", 1e-3)):
        (tmp_path / f"{name}.yaml").write_text(
            f"model: efficientnet_lite0\nstrategy: native\nlr: {lr}\nseed: {7 if name == 'slow' else 99}\n"
        )
    runs = plan_runs([str(tmp_path / "slow.yaml"), str(tmp_path / "fast.yaml")], None, {}, tmp_path / "out")
    assert [run.name for run in runs] == ["slow_native", "fast_native"]
    assert [run.cfg.lr for run in runs] == [1e-4, 1e-3]
    assert {run.cfg.seed for run in runs} == {7}  # the first recipe's seed (and split) for all


def test_bad_strategy_list_is_one_line_error(demo_data, tmp_path, capsys):
    assert main(["study", "--data", str(demo_data), "--strategies", "native,zoom:3", "--out", str(tmp_path)]) == 2
    assert "unknown strategy" in capsys.readouterr().err
    with pytest.raises(UserError, match="share the folder"):
        plan_runs(["cpu"], ["native", "native"], {}, tmp_path)


def test_a_run_training_adjusted_to_its_data_is_reused_on_rerun(demo_data, tmp_path, capsys):
    """Data without HR twins trains the cpu recipe without its teacher, so the saved config differs from the planned
    one: the rerun still recognises the run as its own instead of refusing the folder."""
    import shutil

    data = Path(shutil.copytree(demo_data, tmp_path / "no-twins"))
    table = pd.read_csv(data / "train.csv")
    table.drop(columns="upscale_img_path").to_csv(data / "train.csv", index=False)
    argv = ["study", "--data", str(data), "--strategies", "native", "--out", str(tmp_path / "out"), *TINY]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "no high-res twins" in first and "reused" not in first
    assert main(argv) == 0
    assert "[native] finished earlier with the same config; reused" in capsys.readouterr().out


def test_a_row_that_would_replace_an_input_is_refused_before_any_row_trains(demo_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["study", "--data", str(demo_data), "--strategies", "upscale:80,native", "--out", str(out), *TINY]
    assert main([*argv, "--init-from", str(out / "native"), "--no-student-from-teacher", "--force"]) == 2
    assert "is also given as --init-from" in capsys.readouterr().err
    assert not (out / "upscale-80").exists()
