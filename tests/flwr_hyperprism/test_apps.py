"""The Flower apps: Ray-free grid runs (fast) and a real Simulation Runtime run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flwr_hyperprism.client_app import app as client_app
from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.server_app import run
from simulations.run import run_experiment
from strategies import ALGORITHMS
from strategies.decentralized import wait_for_partitions
from tests.harness import LocalGrid
from tests.variants import metrics_rows


def tiny_config(tmp_path: Path, name: str, **changes) -> RunConfig:
    settings = {"num_nodes": 4, "num_rounds": 3, "momentum": 0.5, "swarm_local_steps": 20,
                "output_dir": str(tmp_path), "run_name": name, "node_wait_timeout": 5.0}
    return RunConfig(**{**settings, **changes})


def test_flower_grid_run_equals_in_process_run(tmp_path):
    config = tiny_config(tmp_path, "grid")
    result = run(LocalGrid.with_nodes(client_app, config.num_nodes), config)
    run_experiment(config.replace(run_name="inprocess"), "inprocess")
    flower_rows = metrics_rows(tmp_path / "grid")
    assert flower_rows == metrics_rows(tmp_path / "inprocess")
    assert sorted(result.train_metrics_clientapp) == [0, 1, 2, 3]
    assert flower_rows[-1]["accuracy_mean"] > flower_rows[0]["accuracy_mean"] + 0.3
    summary = json.loads((tmp_path / "grid" / "summary.json").read_text())
    assert summary["max_accuracy"] == max(r["accuracy_mean"] for r in flower_rows)
    assert summary["rounds_completed"] == 3


def test_wait_for_partitions_maps_partitions_to_node_ids():
    grid = LocalGrid.with_nodes(client_app, 3)
    mapping = wait_for_partitions(grid, 3, timeout=1.0)
    assert mapping == {pid: 1000 + 7 * pid for pid in range(3)}


@pytest.mark.parametrize("partitions, expected, message", [
    ({1: (0, 2), 2: (1, 2)}, 3, "num-partitions=2 but the run config has num-nodes=3"),
    ({1: (0, 2), 2: (0, 2)}, 2, "partition id 0 is claimed by nodes"),
])
def test_wait_for_partitions_rejects_a_mismatched_federation(partitions, expected, message):
    with pytest.raises(RuntimeError, match=message):
        wait_for_partitions(LocalGrid(client_app, partitions), expected, timeout=1.0)


def test_wait_for_partitions_times_out_with_the_fix_in_the_message():
    grid = LocalGrid(client_app, {5: (0, 3), 6: (1, 3)})
    with pytest.raises(RuntimeError, match=r"only 2 of num-nodes=3 .*num-supernodes=3"):
        wait_for_partitions(grid, 3, timeout=0.3)


# ADOM+ and Mudag take one stochastic gradient per round: they need more rounds to get going,
# and ADOM+ on the synthetic task is still at 44% after 15 rounds (chance is 10%). Local
# training sees only its own classes (alpha = 0.1): 38% after round 1, then flat.
ROUNDS = {"adom": 15, "mudag": 12}
MIN_ACCURACY = {"adom": 0.3, "local": 0.25}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_simulation_runtime_run_learns_and_equals_in_process_run(tmp_path, algorithm):
    config = tiny_config(tmp_path, "ray", node_wait_timeout=120.0, algorithm=algorithm,
                         num_rounds=ROUNDS.get(algorithm, 3))
    run_experiment(config, "flower", tmp_path / "ray")
    run_experiment(config, "inprocess", tmp_path / "inprocess")
    rows = metrics_rows(tmp_path / "ray")
    assert [r["nodes_replied"] for r in rows] == [4] * (config.num_rounds + 1)
    assert rows[-1]["accuracy_mean"] > MIN_ACCURACY.get(algorithm, 0.5)  # chance is 0.1
    assert all(r["neighbours_dropped_mean"] == 0 for r in rows)  # the guard spares honest peers
    assert rows == metrics_rows(tmp_path / "inprocess")
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["algorithm_name"] == ALGORITHMS[algorithm].orchestrator.description
