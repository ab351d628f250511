"""The package layout: one direction of dependencies, no cycles, no reaching into another module's privates,
and a CLI that starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lowres_birds"
# Lower layers never import higher ones: cli -> inspect -> train / predict -> model / data -> run_dir -> config ->
# errors.
LAYERS = {
    "errors": 0,
    "runtime": 0,
    "progress": 0,
    "extras": 1,
    "config": 1,
    "metrics": 1,
    "run_dir": 2,
    "data": 3,
    "model": 3,
    "train": 4,
    "predict": 4,
    "inspect": 5,
    "cli": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported lowres_birds module, names taken from it) for every import statement, function-level ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowres_birds"):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("lowres_birds")]
    return found


MODULES = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m not in ("lowres_birds", "lowres_birds.__main__") and layer(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_only(module):
    if module in ("lowres_birds", "lowres_birds.__main__"):  # the package facade and `python -m`
        return
    for target, _ in imports_of(module):
        same_package = target.split(".")[:2] == module.split(".")[:2]
        assert same_package or layer(target) < layer(module), f"{module} imports {target} (a layer at or above its own)"


def imports_of(module: str) -> list[tuple[str, list[str]]]:
    return [(target, names) for target, names in MODULES[module] if target != "lowres_birds"]


def test_no_module_imports_another_modules_private_names():
    offences = [
        (m, t, n)
        for m, found in MODULES.items()
        for t, names in found
        for n in names
        if n.startswith("_") and not n.endswith("__") and t != m
    ]
    assert offences == []


def test_nothing_imports_the_cli_and_only_cli_and_study_import_training():
    importers_of_cli = [m for m, found in MODULES.items() if any(t == "lowres_birds.cli" for t, _ in found)]
    assert importers_of_cli == ["lowres_birds.__main__"]
    importers_of_train = {
        m for m, found in MODULES.items() if any(t.startswith("lowres_birds.train") for t, _ in found)
    }
    assert {m for m in importers_of_train if not m.startswith("lowres_birds.train")} == {
        "lowres_birds",  # the facade's train_run
        "lowres_birds.cli",
        "lowres_birds.inspect.study",
    }


def test_no_import_cycles():
    graph = {m: {t for t, _ in imports_of(m) if t in MODULES} for m in MODULES}
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(path[path.index(node) :] + [node])
        visiting.add(node)
        for target in graph[node]:
            visit(target, path + [node])
        visiting.discard(node)
        done.add(node)

    for module in graph:
        visit(module, [])


def test_cli_and_every_help_start_without_torch():
    code = (
        "import sys, contextlib, io\n"
        "from lowres_birds.cli import COMMANDS, main\n"
        "for command in [None, *COMMANDS]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([command, '--help'] if command else ['--help'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_train_help_documents_every_option():
    from lowres_birds.cli import build_parser
    from lowres_birds.config import FIELDS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    printed = "".join(train.format_help().split())  # as argparse prints it: %-formatted, wrapped (at hyphens too)
    assert "'option_strings'" not in printed  # a lone % in a help text makes argparse print its action's dict
    for name, spec in FIELDS.items():
        default = "".join(f"default {spec.default})".split())
        assert "".join(spec.metadata["help"].split()) in printed and default in printed, name


def test_importing_the_package_leaves_pil_and_the_warning_filters_as_they_were():
    """A library import changes no process-wide setting (the CLI sets what it needs in main)."""
    code = (
        "import warnings, accelerate, numpy, pandas, scipy.special, sklearn.metrics, timm, torch, PIL.Image as Image\n"
        "before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))\n"
        "import lowres_birds.data.images, lowres_birds.predict.classifier, lowres_birds.train.loop\n"
        "assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before, 'changed'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
