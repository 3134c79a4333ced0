"""The package's shape: the layer boundaries hold, and the built wheel imports from outside the checkout.

The import contracts live in pyproject.toml ([tool.importlinter]). import-linter finds modules by
walking the package's folder, and the checkout maps folders onto `handoff.*` (shared/ is
handoff.shared), so the linter runs on a copy laid out as installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONFIG = tomllib.loads(PYPROJECT.read_text())
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def stage_package(dest: Path) -> Path:
    """Copy the package folders into dest/handoff/... as pyproject's package-dir maps them (as installed)."""
    package_dir: dict[str, str] = CONFIG["tool"]["setuptools"]["package-dir"]
    for name in sorted(package_dir, key=lambda n: n.count(".")):  # handoff first, then its subpackages
        shutil.copytree(ROOT / package_dir[name], dest.joinpath(*name.split(".")), ignore=IGNORED)
    return dest


def lint_imports(tree: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """import-linter with pyproject's contracts over the package in `tree` (it comes first on sys.path)."""
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run(
        [sys.executable, "-c", code, str(PYPROJECT), "--no-cache", "--no-logo"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "300", **(env or {})},
    )


def contract_names() -> list[str]:
    return [c["name"] for c in CONFIG["tool"]["importlinter"]["contracts"]]


def test_the_import_contracts_hold(tmp_path):
    tree = stage_package(tmp_path)
    assert (tree / "handoff" / "shared" / "divergence.py").is_file()
    proc = lint_imports(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(contract_names())
    assert n >= 6 and f"Contracts: {n} kept, 0 broken." in proc.stdout, proc.stdout


LEAVES = "evaluation, routing and simulation are leaves: only the command line imports them"
INDEPENDENT = "evaluation, routing and simulation are independent"
PER_LAYER_CLI = "the per-layer CLI modules are imported only by the command line"


def broken_contracts(report: str) -> set[str]:
    return {line.removesuffix(" BROKEN") for line in report.splitlines() if line.endswith(" BROKEN")}


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # The base layer reaching up into the cloud.
        ("shared/errors.py", "import handoff.cloud.service", {"shared imports nothing else of ours"}),
        # The cloud importing the edge, from inside a function.
        (
            "cloud/settings.py",
            "def _late():\n    from handoff.edge import controller",
            {"cloud imports only shared"},
        ),
        # An edge module importing a leaf (evaluation imports the edge, so it now reaches simulation too).
        ("edge/runner.py", "import handoff.edge.simulation.traces", {LEAVES, INDEPENDENT}),
        # One leaf importing the other.
        ("edge/evaluation/report.py", "from handoff.edge.simulation import traces", {LEAVES, INDEPENDENT}),
        # The edge importing the command line, or a layer's part of it (made here if it is not there yet).
        ("edge/serving.py", "import handoff.cli", {"edge does not import the command line"}),
        ("edge/serving.py", "import handoff.shared.cli", {PER_LAYER_CLI}),
    ],
    ids=[
        "shared->cloud",
        "cloud->edge",
        "edge->simulation",
        "evaluation->simulation",
        "edge->cli",
        "edge->shared.cli",
    ],
)
def test_a_violating_import_breaks_its_contract(tmp_path, module: str, line: str, broken: set[str]):
    """The check can fail: the same contracts over a copy with one forbidden import added."""
    tree = stage_package(tmp_path)
    (tree / "handoff" / "shared" / "cli.py").touch()  # the CLI split may not have made it yet
    path = tree / "handoff" / module
    path.write_text(path.read_text() + f"\n\n{line}  # noqa\n")
    proc = lint_imports(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # The rule the import breaks; others may break too through chains it opens (an edge module that
    # imports the CLI reaches every leaf through it).
    found = broken_contracts(proc.stdout)
    assert broken <= found, proc.stdout
    assert f"Contracts: {len(contract_names()) - len(found)} kept, {len(found)} broken." in proc.stdout


# --------------------------------------------------------------------------------------------------
# Installed, not run from the checkout


def test_the_wheel_installs_and_imports_from_outside_the_checkout(tmp_path):
    """Only `handoff/...` in the wheel (no top-level edge, cloud or shared), and an install of it works alone.

    Built from a copy of the sources so that the build leaves nothing (build/, egg-info) in the checkout;
    no build isolation and --no-deps, so nothing is downloaded.
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in set(CONFIG["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=IGNORED)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(wheels)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = wheels.glob("handoff-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/", 1)[0] for name in z.namelist()}
        names = set(z.namelist())
    assert tops == {"handoff", wheel.name.split("-py")[0] + ".dist-info"}, tops
    assert {"handoff/edge/controller.py", "handoff/shared/wire/handoff_pb2.pyi"} <= names
    # Package data: serve-edge's chat page (GET /) is served from the installed package.
    assert {f"handoff/edge/static/{f}" for f in ("index.html", "app.js", "style.css")} <= names
    # Every package folder in the sources is in the wheel (pyproject lists the packages by hand).
    staged = stage_package(tmp_path / "staged")
    inits = {p.relative_to(staged).as_posix() for p in staged.rglob("__init__.py")}
    assert inits - names == set(), "missing from [tool.setuptools] packages"

    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert not any((target / name).exists() for name in ("edge", "cloud", "shared"))

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = (
        "import handoff, handoff.edge.controller, handoff.cloud.service, handoff.shared.divergence\n"
        "print(handoff.__file__)\n"
        "print(handoff.edge.controller.__file__)\n"
    )
    # The checkout is neither the cwd nor on PYTHONPATH; the venv's editable install of it stays, but its
    # finder comes after PYTHONPATH's entries: the __file__ check shows which copy was imported.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=outside, capture_output=True, text=True, timeout=300,
        env={**env, "PYTHONPATH": str(target)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = [Path(line) for line in proc.stdout.splitlines()]
    assert len(files) == 2 and all(f.is_relative_to(target) for f in files), (files, target)
