"""Imports flow one way (docs/design.md): the contracts in pyproject.toml, checked by import-linter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("tools", "pretrain", "optim", "data", "models")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first, so that a copied tree is analysed rather than the editable install
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_keel_keeps_its_import_contracts():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, planted, report", [
    ("models/gpt.py", "import pretrain.config", "models.gpt -> pretrain.config"),  # model code reading the run config
    ("data/loader.py", "import models.config", "data.loader -> models.config"),
    ("optim/schedule.py", "from models import builder", "optim.schedule -> models.builder"),
    # the cycles the layers inside optim and pretrain.checkpoint forbid
    ("optim/rules/main_params.py", "from optim import optimizer", "optim.rules.main_params -> optim.optimizer"),
    ("pretrain/checkpoint/manifest.py", "from pretrain.checkpoint import io",
     "pretrain.checkpoint.manifest -> pretrain.checkpoint.io"),
])
def test_a_planted_backward_import_breaks_its_contract(tmp_path, module, planted, report):
    # 1. a copy of keel's packages and its contracts
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    # 2. one import against the flow: exactly one contract breaks, and its report names that import
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{planted}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "4 kept, 1 broken" in result.stdout, result.stdout
    assert report in result.stdout, result.stdout
