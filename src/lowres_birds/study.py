"""Resolution study: one model per strategy (or per recipe) on the same validation split, seed and time
budget, then one table and chart beside the reference's published numbers.

Each run is an ordinary run folder under OUT (``lowres-birds report --run OUT/<name>`` works on it). A
finished run with the same config is reused and an interrupted one resumed, so an interrupted study
restarts where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from lowres_birds.config import FIELD_TYPES, RunConfig, load_config, load_run_config
from lowres_birds.errors import UserError
from lowres_birds.reports import Section, markdown_table, write_page
from lowres_birds.resolution import parse_strategy

# Private-leaderboard macro-F1 of the reference (BEiT-base, 5 epochs) for its four strategies.
REFERENCE_MACRO_F1 = {"hr-downscale:64": 0.72, "upscale:256": 0.75, "native": 0.85, "upscale:224": 0.886}
RESULT_FILE = "study_result.json"


@dataclass
class StudyRun:
    name: str
    recipe: str
    cfg: RunConfig
    run_dir: Path


def plan_runs(recipes: list[str], strategies: list[str] | None, overrides: dict, out_dir: Path) -> list[StudyRun]:
    """Every recipe x strategy, all sharing the first recipe's seed, validation fraction and budget."""
    first = load_config(recipes[0], overrides)
    shared = {**overrides, "seed": first.seed, "val_fraction": first.val_fraction, "budget_minutes": first.budget_minutes}
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


def run_or_reuse(run: StudyRun, data_dir: Path, force: bool) -> dict:
    """Train the run, reuse it when finished with the same config, resume it when interrupted."""
    from lowres_birds.training import CHECKPOINT, train

    saved = run.run_dir / "config.yaml"
    same_config = saved.is_file() and load_run_config(saved) == run.cfg
    if same_config and not force and (run.run_dir / RESULT_FILE).is_file():
        print(f"[{run.name}] finished earlier with the same config; reused")
        return json.loads((run.run_dir / RESULT_FILE).read_text(encoding="utf-8"))
    if same_config and not force and (run.run_dir / CHECKPOINT).is_file():
        print(f"[{run.name}] resuming an interrupted run")
        result = train(None, data_dir, run.run_dir, resume=True)
    else:
        if run.run_dir.exists() and any(run.run_dir.iterdir()) and not (force or same_config):
            raise UserError(f"study: {run.run_dir} holds a run with another config; pass --force to replace it or choose another --out")
        print(f"[{run.name}] training {run.cfg.model} with strategy {run.cfg.strategy}")
        result = train(run.cfg, data_dir, run.run_dir, force=True)
    (run.run_dir / RESULT_FILE).write_text(json.dumps(result), encoding="utf-8")
    return result


def result_row(run: StudyRun) -> dict:
    """One table row from the run's metrics.jsonl: the best epoch's scores, time and throughput."""
    from lowres_birds.report import read_metrics

    metrics = read_metrics(run.run_dir)
    best = metrics.loc[metrics["val_macro_f1"].idxmax()]
    strategy = parse_strategy(run.cfg.strategy)
    return {
        "recipe": Path(run.recipe).stem,
        "model": run.cfg.model,
        "strategy": str(strategy),
        "trained on": "HR 256 twins" if strategy.train_source == "hr" else "LR 64",
        "model input": f"{strategy.input_size}x{strategy.input_size}",
        "epochs": f"{len(metrics)}/{run.cfg.epochs}",
        "budget (min)": f"{run.cfg.budget_minutes:g}" if run.cfg.budget_minutes else "none",
        "val macro-F1": float(best["val_macro_f1"]),
        "val accuracy": float(best["val_accuracy"]),
        "train time (s)": round(float(metrics["elapsed_s"].iloc[-1])),
        "images/s": round(float(metrics["train_images_per_s"].mean()), 1),
        "reference macro-F1 (BEiT, private test)": REFERENCE_MACRO_F1.get(str(strategy), float("nan")),
    }


def chart_png(table, path: Path) -> Path:
    """Two panels on one 0-1 scale: this study's validation macro-F1 and the reference's private-test macro-F1."""
    from lowres_birds.plots import pyplot

    plt = pyplot()
    labels = [f"{r}\n{s}" if table["recipe"].nunique() > 1 else s for r, s in zip(table["recipe"], table["strategy"])]
    panels = [
        (labels, table["val macro-F1"].tolist(), "this study: validation macro-F1", "#4a7ab8"),
        (list(REFERENCE_MACRO_F1), list(REFERENCE_MACRO_F1.values()), "reference (BEiT): private-test macro-F1", "#999999"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, (names, values, title, colour) in zip(axes, panels):
        bars = ax.bar(range(len(names)), values, color=colour)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("macro-F1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(runs: list[StudyRun], out_dir: Path, split_note: str):
    """results.csv, results.md, results.png and study.html; returns the table."""
    import pandas as pd

    table = pd.DataFrame([result_row(run) for run in runs])
    table.to_csv(out_dir / "results.csv", index=False)
    markdown = f"{split_note}\n\n{markdown_table(table)}"
    (out_dir / "results.md").write_text(markdown, encoding="utf-8")
    chart = chart_png(table, out_dir / "results.png")
    reference = pd.DataFrame({"strategy": list(REFERENCE_MACRO_F1), "private macro-F1": list(REFERENCE_MACRO_F1.values())})
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


# --------------------------------------------------------------------------- command line


def add_study(sub) -> None:
    from lowres_birds.cli import _add_config_overrides

    parser = sub.add_parser("study", help="compare resolution strategies (or recipes) on one validation split", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="competition folder (train.csv, train/, upscale_train/)")
    parser.add_argument("--recipe", default="cpu", help="recipe shared by all strategies")
    parser.add_argument("--recipes", help="comma-separated recipes to compare (replaces --recipe); each keeps its own strategy unless --strategies is given, all take the first recipe's seed, validation fraction and budget")
    parser.add_argument("--strategies", help="comma-separated strategies, e.g. native,upscale:224,upscale:256,hr-downscale:64 (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder: one run folder per row, results.* and study.html")
    parser.add_argument("--force", action="store_true", help="retrain runs that already exist in --out")
    parser.add_argument("--note", default="", help="sentence put before the table, e.g. how sizes were adapted to the hardware")
    _add_config_overrides(parser)


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"study: empty list {text!r}; give comma-separated names")
    return items


def run_study(args) -> int:
    started = time.perf_counter()
    recipes = _split_list(args.recipes) or [args.recipe]
    strategies = _split_list(args.strategies)
    overrides = {name: getattr(args, name) for name in FIELD_TYPES}
    if strategies and overrides["strategy"] is not None:
        raise UserError("study: pass either --strategies or --strategy, not both")
    runs = plan_runs(recipes, strategies, overrides, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    for index, run in enumerate(runs, start=1):
        print(f"--- run {index}/{len(runs)}: {run.name}")
        run_or_reuse(run, args.data, args.force)
    cfg = runs[0].cfg
    budget = f"{cfg.budget_minutes:g} min per run, training stops after the epoch that crosses it" if cfg.budget_minutes else "none"
    note = (
        f"{args.note + ' ' if args.note else ''}All rows share the validation split (seed {cfg.seed}, {cfg.val_fraction:.0%} of "
        f"{args.data}), the seed and the time budget ({budget}). Validation macro-F1 is the best epoch's; the reference column "
        "is the reference's private-test score with BEiT-base at 5 epochs (another model and test set: compare the ranking, not the values)."
    )
    table = write_results(runs, args.out, note)
    print(markdown_table(table))
    print(f"study of {len(runs)} runs finished in {time.perf_counter() - started:.0f}s; table: {args.out / 'results.md'}, page: {args.out / 'study.html'}")
    return 0
