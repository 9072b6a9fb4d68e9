"""simulations.run: the GPU share each Ray actor of a Flower-engine run asks for."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.setup.config import RunConfig
from simulations import run


def test_a_cpu_run_asks_ray_for_no_gpu():
    assert run.gpu_share(RunConfig(device="cpu")) == 0.0
    assert run.gpu_share(RunConfig(device="auto")) == 0.0  # the suite hides CUDA (conftest)


@pytest.mark.parametrize(("gpus", "cpus", "share"), [(1, 16, 1 / 16), (2, 4, 0.5), (8, 4, 1.0)])
def test_a_cuda_run_splits_the_gpus_over_the_one_cpu_actors(monkeypatch, gpus, cpus, share):
    monkeypatch.setattr(run, "resolve_device", torch.device)  # as if the machine had them
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert run.gpu_share(RunConfig(device="cuda")) == share
    assert run.gpu_share(RunConfig(device="cuda:0")) == share
    with pytest.raises(ValueError, match="device='cuda:1': Ray numbers each actor's GPUs from 0"):
        run.gpu_share(RunConfig(device="cuda:1"))
