"""Imports point one way along the pipeline: the contracts in pyproject.toml ([tool.importlinter]) hold for the
tree, and a tree with an upward import, a circle or torch behind the result store breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint(tree: Path) -> subprocess.CompletedProcess:
    """import-linter on the svdicl package in `tree` with the contracts of its pyproject.toml, in a fresh interpreter
    (so it reads that tree's svdicl, not the one this process imported)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_import_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("models.py", "import svdicl.experiments.sweep", "svdicl.models -> svdicl.experiments.sweep"),  # upward
        ("experiments/runs.py", "import svdicl.experiments.sweep", "No cycles are allowed in svdicl.experiments"),
        ("specs.py", "import torch", "svdicl.store is not allowed to import torch"),  # store -> specs -> torch
    ],
)
def test_an_upward_import_a_circle_or_torch_behind_the_store_breaks_them(tmp_path, module, line, broken):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "svdicl", tree / "svdicl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    with open(tree / "svdicl" / module, "a") as handle:
        handle.write(f"\n{line}\n")
    result = lint(tree)
    assert result.returncode == 1 and broken in result.stdout, result.stdout + result.stderr
