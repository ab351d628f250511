"""The lean default install and its extras: a command whose extra is missing says which pip command installs
it, in one line; train, predict and evaluate need none of them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_TRAIN

from lowres_birds.cli import main


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["serve", "--run", "RUN"], "serve"),
        (["export", "--run", "RUN", "--out", "OUT/m.onnx"], "onnx"),
        (["eda", "--data", "DATA", "--out", "OUT/eda"], "eda"),
        (["report", "--run", "RUN", "--out", "OUT/report"], "report"),
        (["train", "--data", "DATA", "--out", "OUT/run", "--model", "hf:some/model"], "hf"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_pip_command(
    trained_run, demo_data, tmp_path, monkeypatch, capsys, argv, extra
):
    import lowres_birds.extras as extras

    real = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name: None if name in extras.EXTRAS[extra] else real(name))
    argv = [
        a.replace("RUN", str(trained_run)).replace("DATA", str(demo_data)).replace("OUT", str(tmp_path)) for a in argv
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"[{extra}] extra" in err and "pip install" in err and f"[{extra}]'" in err


def test_the_report_after_training_is_skipped_with_one_warning_without_its_extra(trained_run, monkeypatch):
    import lowres_birds.extras as extras
    from lowres_birds.inspect.report import report_after_training

    monkeypatch.setattr(extras, "find_spec", lambda name: None)
    with pytest.warns(UserWarning, match=r"training report skipped: it needs the \[report\] extra \(pip install"):
        report_after_training(trained_run, None)


BLOCKED = (
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "fastapi",
    "uvicorn",
    "python_multipart",
    "multipart",
    "pytorch_grad_cam",
    "cv2",
    "imagehash",
    "skimage",
    "tensorboard",
)


def test_the_default_install_trains_predicts_and_evaluates_without_any_extra(demo_data, tmp_path):
    """What `pip install -e .` has: none of the extras' packages importable (a meta-path blocker stands in for
    their absence), and train (with the HR degradation fit), predict, evaluate and the HF export still work."""
    code = f"""
import importlib.abc, importlib.util, sys
blocked = lambda name: name.split('.')[0] in {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):  # import statements fail as for a package that is not installed
    def find_spec(self, name, path=None, target=None):
        if blocked(name):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
real_find_spec = importlib.util.find_spec  # and availability checks (ours, accelerate's) see nothing
importlib.util.find_spec = lambda name, package=None: None if blocked(name) else real_find_spec(name, package)
import lowres_birds.extras as extras
extras.find_spec = importlib.util.find_spec
from lowres_birds.cli import main
data, out = {str(demo_data)!r}, {str(tmp_path)!r}
assert main(['train', '--data', data, '--out', out + '/run', *{FAST_TRAIN!r}]) == 0
assert main(['predict', '--run', out + '/run', '--data', data, '--out', out + '/s.csv']) == 0
assert main(['evaluate', '--submission', out + '/s.csv', '--labels', data + '/test_labels.csv']) == 0
assert main(['serve', '--run', out + '/run']) == 2
assert not any(name.split('.')[0] in {BLOCKED!r} for name in sys.modules), sorted(sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: training report skipped: it needs the [report] extra" in result.stderr
    assert "serve needs the [serve] extra" in result.stderr
    assert (tmp_path / "run" / "hf" / "config.json").is_file()


def test_psnr_and_ssim_without_scikit_image_give_its_values():
    """The degradation fit's PSNR/SSIM (used by cpu-best) are computed in torch: scikit-image is a test tool only."""
    import torch
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from lowres_birds.train.degradation import psnr_ssim

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-40, 40, real.shape), 0, 255).astype(np.uint8)
    psnr, ssim = psnr_ssim(torch.from_numpy(fake).permute(0, 3, 1, 2), torch.from_numpy(real).permute(0, 3, 1, 2))
    assert psnr == pytest.approx(
        np.mean([peak_signal_noise_ratio(r, f, data_range=255) for f, r in zip(fake, real)]), rel=1e-9
    )
    assert ssim == pytest.approx(
        np.mean([structural_similarity(r, f, channel_axis=-1, data_range=255) for f, r in zip(fake, real)]), rel=1e-9
    )
