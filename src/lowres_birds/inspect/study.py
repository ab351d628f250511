"""Resolution study: one model per strategy (or per recipe) on the same validation split, seed and time
budget, then one table and chart beside the reference's published numbers.

Each run is an ordinary run folder under OUT (``lowres-birds report --run OUT/<name>`` works on it). A
finished run with the same config is reused and an interrupted one resumed, so an interrupted study
restarts where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lowres_birds.config import RunConfig, load_config, parse_strategy
from lowres_birds.data.tables import load_train_table
from lowres_birds.errors import UserError
from lowres_birds.inspect.html import Section, markdown_table, write_page
from lowres_birds.inspect.plots import REFERENCE_MACRO_F1, chart_png
from lowres_birds.inspect.report import read_metrics
from lowres_birds.run_dir import RunDir, check_output, write_csv, write_text
from lowres_birds.train.loop import train
from lowres_birds.train.session import config_for_data

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class StudyRun:
    name: str
    recipe: str
    cfg: RunConfig
    run_dir: Path


def plan_runs(recipes: list[str], strategies: list[str] | None, overrides: dict, out_dir: Path) -> list[StudyRun]:
    """Every recipe x strategy, all sharing the first recipe's seed, validation fraction and budget."""
    first = load_config(recipes[0], overrides)
    shared = {
        **overrides,
        "seed": first.seed,
        "val_fraction": first.val_fraction,
        "budget_minutes": first.budget_minutes,
    }
    runs = []
    for recipe in recipes:
        for strategy in strategies or [None]:
            cfg = load_config(recipe, {**shared, "strategy": strategy} if strategy else shared)
            slug = str(parse_strategy(cfg.strategy)).replace(":", "-")
            name = slug if len(recipes) == 1 else f"{Path(recipe).stem}_{slug}"
            runs.append(StudyRun(name, recipe, cfg, out_dir / name))
    names = [run.name for run in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"study: runs would share the folder {repeated[0]!r}; list each recipe and strategy once")
    return runs


def run_or_reuse(run: StudyRun, data_dir: Path, force: bool) -> None:
    """Train the run, reuse it when finished with the same config (as training adjusted it to the data), resume it
    when interrupted."""
    folder = RunDir(run.run_dir)
    trained = config_for_data(run.cfg, load_train_table(data_dir))[0]
    same_config = (folder / RunDir.CONFIG).is_file() and folder.config() == trained
    if same_config and not force and folder.study_finished():
        print(f"[{run.name}] finished earlier with the same config; reused")
        return
    if same_config and not force and folder.has_checkpoint():
        print(f"[{run.name}] resuming an interrupted run")
        result = train(run.cfg, data_dir, run.run_dir, resume=True)
    else:
        if run.run_dir.exists() and any(run.run_dir.iterdir()) and not (force or same_config):
            raise UserError(
                f"study: {run.run_dir} holds a run with another config; pass --force to replace it or choose another "
                "--out"
            )
        print(f"[{run.name}] training {run.cfg.model} with strategy {run.cfg.strategy}")
        result = train(run.cfg, data_dir, run.run_dir, force=True)
    folder.mark_study_finished(result)


def result_row(run: StudyRun) -> dict:
    """One table row from the run's metrics.jsonl: the scores of the validation whose weights it kept, time and
    throughput."""
    folder = RunDir(run.run_dir)
    metrics, kept = read_metrics(folder), folder.kept_record()
    strategy = parse_strategy(run.cfg.strategy)
    return {
        "recipe": Path(run.recipe).stem,
        "model": run.cfg.model,
        "strategy": str(strategy),
        "trained on": "HR 256 twins" if strategy.train_source == "hr" else "LR 64",
        "model input": f"{strategy.input_size}x{strategy.input_size}",
        "epochs": f"{metrics['epoch'].iloc[-1]:g}/{run.cfg.epochs}",
        "budget (min)": f"{run.cfg.budget_minutes:g}" if run.cfg.budget_minutes else "none",
        "val macro-F1": float(kept["val_macro_f1"]),
        "val accuracy": float(kept["val_accuracy"]),
        "train time (s)": round(float(metrics["elapsed_s"].iloc[-1])),
        "images/s": round(float(metrics["train_images_per_s"].mean()), 1),
        "reference macro-F1 (BEiT, private test)": REFERENCE_MACRO_F1.get(str(strategy), float("nan")),
    }


def write_results(runs: list[StudyRun], out_dir: Path, split_note: str) -> pd.DataFrame:
    """results.csv, results.md, results.png and study.html; returns the table."""
    import pandas as pd

    table = pd.DataFrame([result_row(run) for run in runs])
    write_csv(out_dir / "results.csv", table)
    write_text(out_dir / "results.md", f"{split_note}\n\n{markdown_table(table)}")
    chart = chart_png(table, out_dir / "results.png")
    reference = pd.DataFrame(
        {"strategy": list(REFERENCE_MACRO_F1), "private macro-F1": list(REFERENCE_MACRO_F1.values())}
    )
    write_page(
        out_dir / "study.html",
        "Resolution study",
        [
            Section("Results", [split_note, table, chart]),
            Section("Reference numbers (BEiT-base, private test set)", [reference]),
            Section("Run folders", [f"{run.name}: {run.run_dir}" for run in runs]),
        ],
    )
    return table


def run_study(
    recipes: list[str], strategies: list[str] | None, overrides: dict, data_dir: Path, out: Path, force: bool, note: str
) -> None:
    """Plan, train (or reuse/resume) every run, then write the results table, chart and page."""
    started = time.perf_counter()
    if strategies and overrides.get("strategy") is not None:
        raise UserError("study: pass either --strategies or --strategy, not both")
    runs = plan_runs(recipes, strategies, overrides, out)
    for run in runs:  # every row's folder against every input, before the first row trains
        check_output(run.run_dir, True, folder=True, others=[("--data", data_dir), *run.cfg.input_paths()])
    out.mkdir(parents=True, exist_ok=True)
    for index, run in enumerate(runs, start=1):
        print(f"--- run {index}/{len(runs)}: {run.name}")
        run_or_reuse(run, data_dir, force)
    cfg = runs[0].cfg
    budget = (
        f"{cfg.budget_minutes:g} min per run: each run's epochs and schedule were sized to fit it after its first steps"
        if cfg.budget_minutes
        else "none"
    )
    note = (
        f"{note + ' ' if note else ''}All rows share the validation split (seed {cfg.split_seed_used}, "
        f"{cfg.val_fraction:.0%} of "
        f"{data_dir}), the seed and the time budget ({budget}). Validation macro-F1 is that of the weights each run "
        "kept; the reference column is the reference's private-test score with BEiT-base at 5 epochs (another model "
        "and test set: compare the ranking, not the values)."
    )
    table = write_results(runs, out, note)
    print(markdown_table(table))
    print(
        f"study of {len(runs)} runs finished in {time.perf_counter() - started:.0f}s; table: {out / 'results.md'}, "
        f"page: {out / 'study.html'}"
    )
