"""A fleet run resumed after its ServerApp was stopped has the uninterrupted run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flwr_hyperprism.setup.config import RunConfig
from simulations.run import run_experiment
from tests.fleet import BuiltApp, read_rows, wait_until
from tests.local_flower import loopback_fleet
from tests.variants import metrics_rows


@pytest.mark.slow
def test_a_fleet_run_resumed_after_stopping_its_serverapp_has_the_uninterrupted_metrics(
        tmp_path: Path, built_app: BuiltApp) -> None:
    """Stopped after round-trip 0 and resumed; SuperNode 0 hosts partitions 0 and 2 (a node
    group with one state-dir), SuperNode 1 partition 1."""
    num_nodes, num_supernodes, num_rounds = 3, 2, 2
    run_dir = tmp_path / "runs" / "resumed"
    # node after node (node-batching=false): the in-process reference is one node group
    settings = (f"num-nodes={num_nodes} num-rounds={num_rounds} momentum=0.5 eval-size=500 "
                f"node-batching=false node-wait-timeout=120 round-timeout=120 "
                f"output-dir='{run_dir.parent}' run-name='{run_dir.name}'")
    with loopback_fleet(tmp_path / "fleet", num_supernodes,
                        node_config=lambda i: f"state-dir='{tmp_path / f'state-{i}'}'") as fleet:
        submitted = json.loads(fleet.flwr(["run", str(built_app.source), fleet.connection,
                                           "--format", "json", "--run-config", settings]))
        wait_until(lambda: len(read_rows(run_dir)) >= 1, 240, "no row 0")
        fleet.flwr(["stop", str(submitted["run-id"]), fleet.connection])
        wait_until(lambda: not fleet.serverapps(), 60, "the stopped ServerApp still runs")
        stopped_at = len(read_rows(run_dir))
        output = fleet.flwr(["run", str(built_app.source), fleet.connection, "--stream",
                             "--run-config", f"{settings} resume=true"], timeout=420)
    assert fleet.leftovers() == [], "processes left running"
    assert stopped_at < num_rounds + 1, "the run finished before it was stopped"
    assert "resuming" in output, output[-3000:]

    reference = run_experiment(RunConfig(num_nodes=num_nodes, num_rounds=num_rounds,
                                         momentum=0.5, eval_size=500, node_batching=False,
                                         output_dir=str(tmp_path / "runs"),
                                         run_name="reference"))
    assert metrics_rows(run_dir) == metrics_rows(reference)
