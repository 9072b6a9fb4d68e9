"""Run a configuration from YAML files and ``key=value`` overrides.

    python -m simulations.run simulations/base.yaml num_rounds=20 dataset=mnist data_dir=/data
    python -m simulations.run simulations/base.yaml --engine flower

``--engine inprocess`` (default) drives the strategy's plan and the node rules in this process;
``--engine flower`` runs the same apps through Flower's Simulation Runtime (Ray), one virtual
SuperNode per partition, one CPU per Ray actor (and, with a CUDA ``device``, a share of the
GPUs: ``gpu_share``). Both write metrics.jsonl and summary.json to the run directory and give
identical metrics for the same seed and config with ``node_batching=false`` (on the CPU); with
batched node groups (the default: in-process one group, here one per SuperNode) they agree to
float rounding.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from flwr_hyperprism.orchestration.metrics import default_run_dir
from flwr_hyperprism.setup.config import RunConfig, load_config
from strategies.base.learner import resolve_device

ENGINES = ("inprocess", "flower")


def gpu_share(config: RunConfig) -> float:
    """The GPUs each Ray actor of Flower's simulation asks for: 0 when ``device`` is the CPU;
    with CUDA, the GPUs split evenly over one-CPU actors on the CPUs this process may use (at
    most 1 each). Ray hides the GPUs from an actor that asks for none, so a CUDA run needs a
    share; it numbers each actor's GPUs from 0, so ``cuda:N`` with N > 0 is refused."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        return 0.0
    if device.index:
        raise ValueError(f"device={config.device!r}: Ray numbers each actor's GPUs from 0; "
                         f"use device='cuda' or 'auto' with --engine flower")
    return min(1.0, torch.cuda.device_count() / len(os.sched_getaffinity(0)))


def run_experiment(config: RunConfig, engine: str = "inprocess",
                   run_dir: Path | None = None) -> Path:
    """Run ``config`` with ``engine``; returns the run directory."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    run_dir = run_dir or default_run_dir(config)
    if engine == "inprocess":
        from flwr_hyperprism.orchestration.in_process import run_in_process
        from flwr_hyperprism.orchestration.rounds import round_loop

        run_in_process(round_loop(config, run_dir))
    else:
        from flwr.simulation import run_simulation

        from flwr_hyperprism.client.app import app as client_app
        from flwr_hyperprism.server.app import make_server_app

        run_simulation(
            server_app=make_server_app(config.replace(output_dir=str(run_dir.parent),
                                                      run_name=run_dir.name)),
            client_app=client_app, num_supernodes=config.num_nodes,
            backend_config={"client_resources": {"num_cpus": 1,
                                                 "num_gpus": gpu_share(config)},
                            "init_args": {"logging_level": "ERROR", "log_to_driver": False}},
        )
    return run_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", help="YAML files, then key=value overrides")
    parser.add_argument("--engine", choices=ENGINES, default="inprocess")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.INFO)
    config = load_config([i for i in args.items if "=" not in i],
                         [i for i in args.items if "=" in i])
    print(run_experiment(config, args.engine))


if __name__ == "__main__":
    main()
