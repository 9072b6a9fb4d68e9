"""The type checker (mypy, configured in pyproject.toml): ``--strict`` on the math and the
node rules, its default checks on the Flower strategy, the glue and ``simulations/``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.layers import LAYERS, MATH, REPO, RULES, source

CORE = sorted(str(source(m).relative_to(REPO)) for layer in (MATH, RULES) for m in LAYERS[layer])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")  # shared: the second run reuses torch's


def mypy(cache: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_math_and_the_node_rules_type_check_strictly(cache):
    mypy(cache, "--strict", *CORE)


def test_the_whole_library_and_the_simulations_type_check(cache):
    mypy(cache, "flwr_hyperprism", "strategies", "simulations")
