"""The type checker (mypy, configured in pyproject.toml): ``--strict`` on the math and the
node rules, its default checks on the Flower strategy, the glue and ``simulations/``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.layers import ALGORITHMS, MATH, REPO, SETUP, layer, modules

CORE = sorted(str(path.relative_to(REPO)) for module, path in modules().items()
              if (layer(module) or 0) in (MATH, SETUP, ALGORITHMS) and module != "flwr_hyperprism")
CHECKS = {"strict-core": ["--strict", *CORE],
          "library-and-simulations": ["flwr_hyperprism", "strategies", "simulations"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Both mypy runs, started together (about 30 s of wall time instead of 45)."""
    runs = {name: subprocess.Popen(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path_factory.mktemp(name)),
         *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, args in CHECKS.items()}
    outputs = {name: run.communicate(timeout=600)[0] for name, run in runs.items()}
    return {name: (runs[name].returncode, output) for name, output in outputs.items()}


@pytest.mark.parametrize("check", list(CHECKS))
def test_mypy_finds_no_errors(results, check):
    returncode, output = results[check]
    assert returncode == 0, output
