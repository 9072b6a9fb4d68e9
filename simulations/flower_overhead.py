"""Benchmark: a round through Flower's Simulation Runtime against the same round in-process.

    python -m simulations.flower_overhead simulations/base.yaml simulations/mnist_lr.yaml \\
        num_rounds=5 [key=value ...]

Runs the config with both engines of ``simulations.run`` (same orchestrator, same node rules,
identical metrics) and prints, for each, the end-to-end wall time and the median seconds per
round over rounds 1..R, and the fixed cost outside rounds 1..R (start-up and shutdown: Ray, actors,
data loading, round 0), then the Flower / in-process ratios. Measures and prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from flwr_hyperprism.setup.config import load_config

from .run import ENGINES, run_experiment


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", help="YAML files, then key=value overrides")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    config = load_config([i for i in args.items if "=" not in i],
                         [i for i in args.items if "=" in i])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ENGINES:
            started = time.perf_counter()
            run_dir = run_experiment(config, engine, Path(tmp) / engine)
            wall = time.perf_counter() - started
            rows = [json.loads(line) for line in
                    (run_dir / "metrics.jsonl").read_text().splitlines()]
            results[engine] = (wall, statistics.median(r["seconds"] for r in rows[1:]),
                               wall - sum(r["seconds"] for r in rows[1:]))
    print(f"{config.num_nodes} nodes, {config.num_rounds} rounds, {config.algorithm}, "
          f"{config.dataset}/{config.model}")
    for engine, (wall, per_round, fixed) in results.items():
        print(f"{engine:>10}: end to end {wall:7.1f} s, median {per_round:.3f} s per round, "
              f"{fixed:.1f} s outside rounds 1..{config.num_rounds}")
    (flower_wall, flower_round, _), (local_wall, local_round, _) = (results["flower"],
                                                                    results["inprocess"])
    print(f"flower / inprocess: end to end {flower_wall / local_wall:.2f}x, "
          f"per round {flower_round / local_round:.2f}x")


if __name__ == "__main__":
    main()
