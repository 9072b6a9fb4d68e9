"""Engine benchmark: seconds per round, end-to-end time and peak memory, side by side with a
peer simulator, on one workload.

    python -m simulations.engine_benchmark --data-dir /abs/path/to/shared/data \\
        --fluke-python /abs/path/to/fluke-venv/bin/python

Workload (the issue's): MNIST logistic regression, ``--nodes`` nodes (50), Dirichlet alpha 0.1,
an Erdos-Renyi graph of density 0.5 drawn every round with Metropolis-Hastings weights, lr 0.01,
batch 128, one local epoch, ``--rounds`` rounds (20), every node evaluated on the 10k test set
every round. Engines, each a fresh process tree:

- ``per-node``: the in-process engine stepping node after node (``node-batching=false``);
- ``batched``: the in-process engine, all partitions one node group (the default; torch's
  default threads, ``node-threads=0``);
- ``flwr``: `flwr run` (Flower's Simulation Runtime on a private local SuperLink) with
  ``--supernodes`` SuperNodes (2), each hosting its share of the partitions as a node group;
- ``fluke``: D-PSGD on fluke-fl's decentralized API (``simulations/peers/fluke_dpsgd.py``,
  run by ``--fluke-python``, an interpreter of a separate venv: fluke is never a dependency),
  on the very same partition and graphs (mixing matrices from our D-PSGD plan), with torch's
  default threads (``--fluke-threads``).

Per engine and algorithm it prints s/round (mean of the full rounds 1..R-1; fluke: of its
rounds 2..R, which train, mix and evaluate like ours), the end-to-end wall time of the command,
the peak summed PSS of its process tree (``simulations.load_probe.MemorySampler``) and the
final mean accuracy, then the ratios: fluke's time over each engine's, and HyperPrism's round
over D-PSGD's. Measures and prints; asserts nothing. Other load on the machine perturbs the
timings: ``--repeat`` runs each cell that many times and keeps the best.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flwr_hyperprism.setup.config import RunConfig
from strategies import algorithm_spec
from strategies.base.learner import partitioned

from .load_probe import MIB, MemorySampler, processes_with_env, run_once

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("per-node", "batched", "flwr", "fluke")
TAG = "HP_ENGINE_BENCHMARK"  # marks the process tree of one measured command


WORKLOAD = {"dataset": "mnist", "alpha": 0.1, "density": 0.5, "lr": 0.01, "batch_size": 128,
            "local_epochs": 1, "eval_size": 0}


def workload(data_dir: str, nodes: int, rounds: int, algorithm: str) -> RunConfig:
    """The benchmark's run config."""
    return RunConfig.build(algorithm, data_dir=data_dir, num_nodes=nodes, num_rounds=rounds,
                           **WORKLOAD)


def measured(command: list[str], cwd: Path, timeout: float, interval: float
             ) -> tuple[float, float, str]:
    """Run ``command``; its wall seconds, the peak PSS (MiB) of its process tree, its output."""
    tag = uuid.uuid4().hex
    sampler = MemorySampler(lambda: processes_with_env(TAG, tag), interval)
    sampler.start()
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=cwd, env={**os.environ, TAG: tag}, text=True,
                              capture_output=True, timeout=timeout, check=False)
    finally:
        sampler.stop()
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return wall, sampler.peak_pss / MIB, done.stdout + done.stderr


def in_process(config: RunConfig, batched: bool, work: Path, timeout: float, interval: float
               ) -> dict:
    """``python -m simulations.run`` of ``config`` in a fresh process."""
    overrides = {**WORKLOAD, "algorithm": config.algorithm, "data_dir": config.data_dir,
                 "num_nodes": config.num_nodes, "num_rounds": config.num_rounds,
                 "node_batching": str(batched).lower(), "output_dir": str(work),
                 "run_name": "run"}
    command = [sys.executable, "-m", "simulations.run",
               *(f"{key}={value}" for key, value in overrides.items())]
    wall, pss, _ = measured(command, REPO, timeout, interval)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    full = [row["seconds"] for row in rows[1:config.num_rounds]]
    return {"s_per_round": sum(full) / len(full), "wall_s": wall, "peak_pss_mib": pss,
            "accuracy": rows[-1]["accuracy_mean"]}


def flwr_run(config: RunConfig, supernodes: int, timeout: float, interval: float) -> dict:
    """`flwr run` of ``config`` with ``supernodes`` SuperNodes (``load_probe.run_once``)."""
    overrides = {"dataset": "'mnist'", "data-dir": f"'{config.data_dir}'", "eval-size": "0"}
    result = run_once(config.num_nodes, config.algorithm, config.num_rounds, overrides,
                      interval=interval, timeout=timeout, supernodes=supernodes)
    return {"s_per_round": result["s_per_round"], "wall_s": result["wall_s"],
            "peak_pss_mib": result["peak_pss_mib"], "accuracy": result["accuracy"],
            "pss_at_peak_mib": result["pss_at_peak_mib"]}


def fluke(config: RunConfig, python: str, threads: int, work: Path, timeout: float,
          interval: float) -> dict:
    """fluke-fl's D-PSGD on the same partition (``simulations/peers/fluke_dpsgd.py``) with
    ``threads`` torch threads (0: torch's default, as a fluke user runs it)."""
    _, parts = partitioned(config.dataset, config.data_dir, config.download, config.seed,
                           config.num_nodes, config.alpha, config.min_partition_size)
    partition = work / "partition.npz"
    arrays: dict[str, Any] = {str(pid): part for pid, part in enumerate(parts)}
    np.savez(partition, **arrays)
    plan = algorithm_spec(config.algorithm).plan(config)
    matrices: dict[str, Any] = {str(r): plan.mixing_matrix(plan.graphs.at(r))
                                for r in range(1, config.num_rounds + 1)}
    mixing = work / "mixing.npz"
    np.savez(mixing, **matrices)
    out = work / "fluke.jsonl"
    command = [python, str(REPO / "simulations" / "peers" / "fluke_dpsgd.py"),
               "--data-dir", config.data_dir, "--partition", str(partition),
               "--mixing", str(mixing), "--nodes", str(config.num_nodes),
               "--rounds", str(config.num_rounds), "--lr", str(config.lr),
               "--batch-size", str(config.batch_size), "--seed", str(config.seed),
               "--threads", str(threads), "--out", str(out)]
    wall, pss, _ = measured(command, REPO, timeout, interval)
    rounds = [row for row in map(json.loads, out.read_text().splitlines()) if "round" in row]
    full = [row["seconds"] for row in rounds[1:]]
    return {"s_per_round": sum(full) / len(full), "wall_s": wall, "peak_pss_mib": pss,
            "accuracy": rounds[-1]["accuracy"]}


def run_cell(engine: str, config: RunConfig, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="hp-bench-") as tmp:
        work = Path(tmp)
        if engine == "fluke":
            return fluke(config, args.fluke_python, args.fluke_threads, work, args.timeout,
                         args.interval)
        if engine == "flwr":
            return flwr_run(config, args.supernodes, args.timeout, args.interval)
        return in_process(config, engine == "batched", work, args.timeout, args.interval)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="absolute folder holding MNIST/")
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--algorithms", nargs="+", default=["dpsgd", "hyperprism"])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--supernodes", type=int, default=2, help="SuperNodes of `flwr run`")
    parser.add_argument("--fluke-python", help="python of a venv with fluke-fl 0.8.1 (engine "
                                               "'fluke'; left out without it)")
    parser.add_argument("--fluke-threads", type=int, default=0,
                        help="torch threads of the fluke run (0: torch's default, the cores; "
                             "the batched engine uses the same, node-threads=0)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the best is kept")
    parser.add_argument("--interval", type=float, default=0.2, help="memory sampling period")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    engines = [e for e in args.engines if e != "fluke" or args.fluke_python]
    results: dict[tuple[str, str], dict] = {}
    for algorithm in args.algorithms:
        config = workload(os.path.abspath(args.data_dir), args.nodes, args.rounds, algorithm)
        for engine in engines:
            if engine == "fluke" and algorithm != "dpsgd":
                continue  # fluke has no HyperPrism
            runs = [run_cell(engine, config, args) for _ in range(args.repeat)]
            for run in runs:
                print(json.dumps({"engine": engine, "algorithm": algorithm, **run}), flush=True)
            results[engine, algorithm] = {
                "s_per_round": min(r["s_per_round"] for r in runs),
                "wall_s": min(r["wall_s"] for r in runs),
                "peak_pss_mib": max(r["peak_pss_mib"] for r in runs),
                "accuracy": runs[0]["accuracy"]}
    print(f"\n{'engine':<9} {'algorithm':<11} {'s/round':>8} {'end to end':>10} "
          f"{'peak PSS':>9} {'acc':>7}")
    for (engine, algorithm), r in results.items():
        print(f"{engine:<9} {algorithm:<11} {r['s_per_round']:>8.3f} {r['wall_s']:>9.1f}s "
              f"{r['peak_pss_mib']:>5.0f} MiB {r['accuracy']:>7.4f}")
    peer = results.get(("fluke", "dpsgd"))
    print("\nratios")
    for (engine, algorithm), r in results.items():
        if peer is not None and engine != "fluke":
            print(f"  {engine:<9} {algorithm:<11} fluke/ours: per round "
                  f"{peer['s_per_round'] / r['s_per_round']:.2f}x, end to end "
                  f"{peer['wall_s'] / r['wall_s']:.2f}x; memory ours/fluke "
                  f"{r['peak_pss_mib'] / peer['peak_pss_mib']:.2f}x")
        if algorithm == "hyperprism" and (engine, "dpsgd") in results:
            print(f"  {engine:<9} hyperprism/dpsgd per round: "
                  f"{r['s_per_round'] / results[engine, 'dpsgd']['s_per_round']:.2f}x")
    print(f"(s/round: best of {args.repeat}; per round excludes round 0's set-up and the last, "
          f"merge-only round; memory: peak summed PSS of the command's process tree)")


if __name__ == "__main__":
    main()
