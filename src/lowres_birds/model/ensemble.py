"""An ensemble as one model: the run folders a trained folder stands for (an ensemble recipe's members, a folds
folder's folds, or one run), their weights, and their weighted mean probability with flip TTA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowres_birds.config import RunConfig
from lowres_birds.errors import UserError
from lowres_birds.model.factory import load_run_model
from lowres_birds.model.wrapper import BirdNet, in_batches
from lowres_birds.run_dir import RunDir, model_folders


def f1_weights(members: list[Path], what: str, remedy: str) -> list[float]:
    """Each run's validation macro-F1 (of the weights it kept), normalised to sum 1 (as the competition's 1st place
    weighted its fold ensemble); ``what`` and ``remedy`` frame the one-line refusal when every score is 0."""
    scores = [RunDir(member).require().kept_val_macro_f1() for member in members]
    if sum(scores) <= 0:
        runs = ", ".join(map(str, members))
        raise UserError(f"{what}: every model's validation macro-F1 is 0 ({runs}); {remedy}")
    return [score / sum(scores) for score in scores]


def member_runs(source: Path) -> tuple[list[Path], list[float]]:
    """(run folders, weights): every run ``source`` stands for, weighted by its kept weights' validation
    macro-F1 (normalised, as ``predict --ensemble f1``), refused in one line where one is not a trained run folder."""
    members = model_folders(source)
    for member in members:
        if not (Path(member) / RunDir.METRICS).is_file():
            raise UserError(
                f"{member} is not a trained run folder (no {RunDir.METRICS}); pass a folder written by "
                "lowres-birds train (a run, an ensemble recipe's folder or a folds folder)"
            )
    return members, f1_weights(members, f"--distill-from {source}", "nothing to weigh them by")


def member_shares(weights: list[float] | None, count: int) -> list[float]:
    """Each of ``count`` models' share of an ensemble: ``weights`` (summing to 1), or None for a plain mean."""
    return list(weights) if weights else [1 / count] * count


def combined_calibration(
    shares: list[float], temperatures: list[float], thresholds: list[float | None]
) -> tuple[float, float | None]:
    """An ensemble's temperature and unknown threshold (what ``combine_outputs`` uses and flags against): the
    members' weighted means; no threshold unless every member has one."""
    temperature = float(np.average(temperatures, weights=shares))
    return temperature, None if None in thresholds else float(np.average(thresholds, weights=shares))


def combine_outputs(
    outputs: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor, temperatures: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several calibrated models as one: ``outputs`` (each model's calibrated probabilities N x C, unknown scores N),
    ``weights`` (summing to 1) and each model's ``temperatures`` -> (probabilities, unknown scores).

    The probabilities are ``softmax(log(weighted mean of the plain softmax outputs) / weighted mean temperature)``
    (each plain output is ``softmax(T log p)`` of a model's calibrated ``p``): the members' held-out splits differ, so
    no common set exists to fit one temperature on (on cub100-lr this beat averaging calibrated members: ECE 0.024
    against 0.035, and it keeps the ensemble's labels; BENCHMARKS.md); with every temperature 1, the weighted mean.
    The unknown scores are weighted the same way. Torch operations only: Classifier and the exported ONNX graph
    compute exactly this."""
    plain = torch.stack(
        [probs.float().clamp_min(1e-30).log().mul(t).softmax(-1) for (probs, _), t in zip(outputs, temperatures)]
    )
    mean = (plain * weights.float()[:, None, None]).sum(0)
    probs = mean.clamp_min(1e-30).log().div((weights.float() * temperatures.float()).sum()).softmax(-1)
    unknown = (torch.stack([score.float() for _, score in outputs]) * weights.float()[:, None]).sum(0)
    return probs, unknown


def member_models(members: list[Path], labels: list[str], device: str = "cpu") -> list[BirdNet]:
    """Each run's kept weights, in eval mode on ``device``; every run must know exactly ``labels``."""
    models = []
    for member in members:
        model, member_labels = load_run_model(member, device)
        if member_labels != labels:
            raise UserError(
                f"{member} was trained on other classes than this data's ({len(member_labels)} vs {len(labels)}); "
                "distil from models of the same species"
            )
        models.append(model.eval())
    return models


@torch.no_grad()
def mean_probabilities(models: list[BirdNet], weights: list[float], batch: torch.Tensor, flip: bool) -> torch.Tensor:
    """The models' weighted mean plain softmax on a uint8 NCHW ``batch`` (with ``flip``: averaged with the mirrored
    batch's), weighted as ``predict --ensemble f1`` weighs them (uncalibrated: distillation targets)."""
    views = (batch, batch.flip(-1)) if flip else (batch,)
    total = sum(weight * model(view).float().softmax(-1) for model, weight in zip(models, weights) for view in views)
    return total / len(views)


def ensemble_probabilities(
    members: list[Path], weights: list[float], images: np.ndarray, labels: list[str], device: str = "cpu"
) -> np.ndarray:
    """The members' weighted mean plain softmax with flip TTA on uint8 N x 64 x 64 x 3 ``images``: the distillation
    targets, softened by the student's own kd_temperature, so the members' calibration temperatures (which ``predict
    --run SOURCE`` applies) are left out; every member must know exactly ``labels``."""
    models = member_models(members, labels, device)
    return in_batches(
        lambda batch: mean_probabilities(models, weights, batch.to(device), flip=True), images, desc="soft targets"
    )


def distillation_line(cfg: RunConfig, student_f1: float) -> str | None:
    """One line for a distilled student's report and model card: the models it learned from (and how: once with
    flip TTA, or online), with each one's validation macro-F1 (on its own split), and the student's; None for a run
    that was not distilled."""
    distill_from, how = cfg.distill_from, "online" if cfg.distill_targets == "online" else "flip TTA"
    if cfg.distill_images:
        how += f"; also on the unlabelled photos of {cfg.distill_images}"
    if not distill_from:
        return None
    try:
        members, _ = member_runs(Path(distill_from))
        scores = " / ".join(f"{RunDir(member).kept_val_macro_f1():.4f}" for member in members)
    except UserError:  # moved or removed since: the student is still described
        return f"distilled from {distill_from} (no longer readable); its validation macro-F1 {student_f1:.4f}"
    return (
        f"distilled from {distill_from}: {len(members)} run(s) ({how}, weighted by validation macro-F1) with "
        f"validation macro-F1 {scores} on their own splits; this student {student_f1:.4f} on its split"
    )
