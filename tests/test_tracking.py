"""--log: TensorBoard event files land in the run folder and hold the per-epoch metrics; a tracker whose
package is missing is a one-line error, not a silent no-op."""

from __future__ import annotations

import importlib.util

import pytest

from lowres_birds.cli import main

TINY = [
    "--model",
    "efficientnet_lite0",
    "--strategy",
    "native",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--device",
    "cpu",
]


def test_tensorboard_events_hold_the_epoch_metrics(demo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), "--log", "tensorboard", *TINY]) == 0
    event_files = list(run.rglob("events.out.tfevents.*"))
    assert event_files and all(run in f.parents for f in event_files)
    scalars = {}
    for folder in {f.parent for f in event_files}:
        events = EventAccumulator(str(folder)).Reload()
        scalars.update({tag: events.Scalars(tag) for tag in events.Tags()["scalars"]})
    assert {"train_loss", "val_macro_f1", "val_accuracy", "lr"} <= set(scalars)
    assert [e.step for e in scalars["val_macro_f1"]] == [1, 2]
    assert all(0 <= e.value <= 1 for e in scalars["val_macro_f1"])


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_tracker_package_is_a_one_line_error(tracker, demo_data, tmp_path, capsys):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    assert main(["train", "--data", str(demo_data), "--out", str(tmp_path / "run"), "--log", tracker, *TINY]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --log {tracker} needs the {tracker} package: pip install {tracker} (or use --log none)"
    )
