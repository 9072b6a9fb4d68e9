"""Fixtures shared by the test modules (helpers they share live in ``tests/variants.py``)."""

from __future__ import annotations

import os

# The suite checks properties of CPU runs (metrics bit-identical across engines, resumes and
# devices); `python -m simulations.gpu_check` checks a GPU. CUDA devices are hidden from this
# process and every SuperNode and simulation it starts, before torch is even imported.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

from flwr_hyperprism.math.sgd import MomentumSGD  # noqa: E402
from strategies import register  # noqa: E402
from strategies.base.learner import DataLearner  # noqa: E402

# Algorithm modules outside the package to register before the tests are collected, so that
# every battery runs them too (``os.pathsep``-separated files that declare ``SPEC``; used by
# tests/strategies/test_new_algorithm.py).
EXTRA_ALGORITHMS = "FLWR_HYPERPRISM_TEST_ALGORITHMS"


def _register_extra_algorithms() -> None:
    import importlib.util
    from pathlib import Path

    for file in filter(None, os.environ.get(EXTRA_ALGORITHMS, "").split(os.pathsep)):
        path = Path(file)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"{EXTRA_ALGORITHMS}: {file} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        register(module.SPEC)


_register_extra_algorithms()


@pytest.fixture
def zero_learning_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """No learning: no optimizer moves a parameter, and ADOM+ and Mudag see zero gradients."""
    monkeypatch.setattr(MomentumSGD, "step", lambda self: None)

    def zero_gradient(self, params, gen):
        return {"train_loss": 0.0}, {k: torch.zeros_like(v) for k, v in params.items()}

    monkeypatch.setattr(DataLearner, "gradient", zero_gradient)


@pytest.fixture(autouse=True)
def private_flwr_home(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Plug-in runs write under $FLWR_HOME by default: never into the user's ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
