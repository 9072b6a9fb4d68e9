"""Fixtures shared by the test modules (helpers they share live in ``tests/variants.py``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

# The suite checks properties of CPU runs (metrics bit-identical across engines, resumes and
# devices); `python -m simulations.gpu_check` checks a GPU. CUDA devices are hidden from this
# process and every SuperNode and simulation it starts, before torch is even imported.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from flwr_hyperprism.math.sgd import MomentumSGD  # noqa: E402
from flwr_hyperprism.setup.data import NUM_CLASSES  # noqa: E402
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


@pytest.fixture
def cifar10_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """A tiny CIFAR-10 in its on-disk layout under ``tmp_path`` (``cifar-10-batches-py/``:
    five pickled training batches, ``test_batch`` and ``batches.meta``): 20 images per batch,
    two of each class, each class a colour of its own plus noise (learnable). torchvision
    checks the real archives' md5 sums, which hand-made batches cannot pass: the check is
    bypassed, everything after it (unpickling, HWC -> CHW) runs for real. Returns each batch
    file's (20, 3072) uint8 pixels (red, green, blue planes of 32 x 32)."""
    from torchvision.datasets import CIFAR10, cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, (NUM_CLASSES, 3))
    labels = [c for c in range(NUM_CLASSES) for _ in range(2)]
    images = {}
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        planes = np.repeat(colours[labels], 32 * 32, axis=1) + rng.normal(0, 30, (20, 3072))
        images[name] = planes.clip(0, 255).astype(np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": images[name], "labels": labels}))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(c) for c in range(NUM_CLASSES)]}))
    return images
