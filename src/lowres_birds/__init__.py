"""lowres-birds: classifiers for low-resolution (64x64) bird photos."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from lowres_birds.config import RunConfig
    from lowres_birds.predict.classifier import Classifier

__version__ = "0.1.0"


def __getattr__(name: str) -> type[Classifier]:
    # Imported lazily so `import lowres_birds` (and the CLI's --help) stays fast.
    if name == "Classifier":
        from lowres_birds.predict.classifier import Classifier

        return Classifier
    raise AttributeError(name)


def train_run(cfg: RunConfig, data_dir: str | Path, run_dir: str | Path, **options: bool) -> dict:
    """Train a run as ``lowres-birds train`` does: the run folder (``options``: ``resume``, ``force``), then its
    Hugging Face folder RUN/hf and its report; returns the kept weights' validation scores."""
    from pathlib import Path

    from lowres_birds.inspect.report import after_training
    from lowres_birds.train.loop import train

    result = train(cfg, Path(data_dir), Path(run_dir), **options)
    after_training(Path(run_dir), Path(data_dir))
    return result


__all__ = ["Classifier", "__version__", "train_run"]
