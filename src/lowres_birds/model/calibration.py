"""Calibrated scores and the "unknown" score, as one module every output path shares.

``fit_temperature``: one temperature T fitted by NLL on held-out logits (Guo et al. 2017, temperature scaling): the
probabilities become ``softmax(logits / T)``; the ranking of classes, hence every label and macro-F1, is unchanged
(with flip TTA the two views' calibrated probabilities are averaged, which a close call can tip).

``CalibratedHead``: (pooled features, logits) -> (calibrated probabilities, unknown score), the module Classifier
runs after the network and the ONNX export puts inside the graph. The unknown score is higher for images less like
the training species; an image is flagged ``unknown`` when it is above the run's threshold (set on the validation
split to keep ``KEEP_KNOWN`` of its images). Scores (all on the calibrated logits ``logits / T``):

- ``max_softmax``: minus the top probability (Hendrycks & Gimpel 2017);
- ``max_logit``: minus the top logit (Vaze et al. 2022, "a good closed-set classifier is all you need");
- ``energy``: minus logsumexp of the logits (Liu et al. 2020);
- ``mahalanobis``: the smallest Mahalanobis distance of the L2-normalised pooled features to a training class mean,
  with one shared covariance (Ledoit-Wolf shrinkage; Lee et al. 2018);
- ``knn``: one minus the cosine similarity to the ``KNN_NEIGHBOURS``-th nearest training image (Sun et al. 2022).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("max_softmax", "max_logit", "energy", "mahalanobis", "knn")
FEATURE_SCORES = ("mahalanobis", "knn")  # need pooled features and statistics of the training split
# Chosen on the open-set benchmark (benchmarks/open_set.py, BENCHMARKS.md): AUROC 0.892 (max-softmax 0.844), within
# 0.005 of kNN's at a third of its storage, and 98 % of non-bird photos flagged (kNN 79 %, energy 10 %).
DEFAULT_SCORE = "mahalanobis"
LOGIT_DEFAULT_SCORE = "energy"  # for models without pooled features (Hugging Face backbones)
KEEP_KNOWN = 0.95  # the threshold keeps this share of the validation split (all known species) as known
KNN_NEIGHBOURS = 5
ECE_BINS = 15
UNFITTED = "no validation image is answered wrongly, so no temperature is of least NLL; the scores stay as they are"
STATISTICS = {"mahalanobis": ("means", "precision"), "knn": ("bank",)}  # the tensors each feature score needs


def without_errors(targets: torch.Tensor, *views: torch.Tensor) -> bool:
    """Whether the target is the top class of every row of every view (logits): then the NLL of ``softmax(logits /
    T)`` keeps falling as T -> 0, so no temperature is of least NLL (a small or easy validation split)."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    return all(bool((view.argmax(1) == targets).all()) for view in views)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, mirrored: torch.Tensor | None = None) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on ``targets`` (LBFGS on log T, so T > 0);
    with ``mirrored`` (the logits of the mirror images), of the flip-TTA answer ``(softmax(logits / T) +
    softmax(mirrored / T)) / 2``, which is what a model predicting with flip TTA gives. Log-probabilities work as well
    as logits: softmax is unchanged by a per-row shift. 1 (the scores as they are) when no answer is wrong: the fit
    would run to T -> 0 and make every later answer certain (0.038 on the demo's 38 validation images)."""
    if without_errors(targets, logits, *(() if mirrored is None else (mirrored,))):
        return 1.0
    logits, targets = logits.detach().double(), torch.as_tensor(targets, dtype=torch.long)
    mirrored = None if mirrored is None else mirrored.detach().double()
    log_temperature = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        temperature = log_temperature.exp()
        if mirrored is None:
            loss = F.cross_entropy(logits / temperature, targets)
        else:
            probs = ((logits / temperature).softmax(-1) + (mirrored / temperature).softmax(-1)) / 2
            loss = F.nll_loss(probs.clamp_min(1e-300).log(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp())


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017): the share-weighted mean of |accuracy - confidence|
    over the bins of the top probability. No well-kept library at hand computes it (torchmetrics is not a
    dependency)."""
    return binned_calibration_gap(probs.max(1), probs.argmax(1) == np.asarray(targets), bins)


def binned_calibration_gap(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE from each answer's confidence and whether it was right (what ``expected_calibration_error`` bins)."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def negative_log_likelihood(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean NLL of the true classes (scikit-learn's log_loss over the model's class columns)."""
    from sklearn.metrics import log_loss

    return float(log_loss(targets, probs, labels=np.arange(probs.shape[1])))


def risk_coverage(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage, accuracy, threshold): answering only the images whose top probability is at least ``threshold``
    answers ``coverage`` of them with ``accuracy``; most confident first, one point per image."""
    confidence = probs.max(1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probs.argmax(1) == np.asarray(targets))[order]
    answered = np.arange(1, len(order) + 1)
    return answered / len(order), np.cumsum(correct) / answered, confidence[order]


def feature_statistics(score: str, features: torch.Tensor, targets: torch.Tensor, classes: int) -> dict:
    """What ``score`` needs from the training split's pooled features: class means and the shared precision
    (Mahalanobis) or the normalised features themselves (kNN); nothing for the logit scores."""
    if score not in FEATURE_SCORES:
        return {}
    normalised = F.normalize(features.double(), dim=-1)
    if score == "knn":
        return {"bank": normalised.float()}
    from sklearn.covariance import LedoitWolf

    targets = torch.as_tensor(targets, dtype=torch.long)
    means = torch.stack([normalised[targets == c].mean(0) for c in range(classes)])
    centred = (normalised - means[targets]).numpy()
    precision = torch.from_numpy(LedoitWolf(assume_centered=True).fit(centred).precision_)
    return {"means": means.float(), "precision": precision.float()}


class CalibratedHead(nn.Module):
    """(pooled features, logits) -> (probabilities ``softmax(logits / T)``, unknown score): what scores leave the
    tool as, in PyTorch and inside the ONNX graph alike."""

    def __init__(self, temperature: float, score: str, statistics: dict[str, torch.Tensor]):
        super().__init__()
        self.score = score
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        for name in STATISTICS.get(score, ()):
            self.register_buffer(name, statistics[name].float())
        if score == "mahalanobis":  # (f - m) P (f - m) = f P f - 2 f P m + m P m, with m P and m P m precomputed
            self.register_buffer("means_precision", self.means @ self.precision)
            self.register_buffer("means_norm", (self.means_precision * self.means).sum(-1))

    @property
    def needs_features(self) -> bool:
        return self.score in FEATURE_SCORES

    def forward(self, features: torch.Tensor | None, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = logits.float() / self.temperature
        probs = scaled.softmax(-1)
        if self.score == "max_softmax":
            return probs, -probs.max(-1).values
        if self.score == "max_logit":
            return probs, -scaled.max(-1).values
        if self.score == "energy":
            return probs, -scaled.logsumexp(-1)
        normalised = F.normalize(features.float(), dim=-1)
        if self.score == "knn":
            similarity = normalised @ self.bank.T
            return probs, 1 - similarity.topk(min(KNN_NEIGHBOURS, len(self.bank)), dim=-1).values[:, -1]
        own = ((normalised @ self.precision) * normalised).sum(-1, keepdim=True)
        distances = own - 2 * normalised @ self.means_precision.T + self.means_norm
        return probs, distances.min(-1).values


def threshold_keeping(scores: np.ndarray, keep: float = KEEP_KNOWN) -> float:
    """The unknown-score threshold below which ``keep`` of ``scores`` (images of known species) fall."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), keep))
