"""Run a configuration from YAML files and ``key=value`` overrides.

    python -m simulations.run simulations/base.yaml num_rounds=20 dataset=mnist data_dir=/data
    python -m simulations.run simulations/base.yaml --engine flower

``--engine inprocess`` (default) drives the strategy's plan and the node rules in this process;
``--engine flower`` runs the same apps through Flower's Simulation Runtime (Ray), one virtual
SuperNode per partition. Both write metrics.jsonl and summary.json to the run directory and
give identical metrics for the same seed and config.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from flwr_hyperprism.config import RunConfig, load_config
from flwr_hyperprism.metrics import default_run_dir

ENGINES = ("inprocess", "flower")


def run_experiment(config: RunConfig, engine: str = "inprocess",
                   run_dir: Path | None = None) -> Path:
    """Run ``config`` with ``engine``; returns the run directory."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    run_dir = run_dir or default_run_dir(config)
    if engine == "inprocess":
        from strategies.decentralized import make_strategy, run_in_process

        run_in_process(make_strategy(config, run_dir))
    else:
        from flwr.simulation import run_simulation

        from flwr_hyperprism.client_app import app as client_app
        from flwr_hyperprism.server_app import make_server_app

        run_simulation(
            server_app=make_server_app(config.replace(output_dir=str(run_dir.parent),
                                                      run_name=run_dir.name)),
            client_app=client_app, num_supernodes=config.num_nodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
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
