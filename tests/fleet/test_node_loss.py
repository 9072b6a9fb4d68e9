"""A fleet run survives a killed SuperNode (it rejoins from its checkpoint) and a terminated
one (the run completes without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fleet import CHANCE, BuiltApp, read_rows, wait_until
from tests.local_flower import loopback_fleet


@pytest.mark.slow
def test_a_fleet_run_survives_a_killed_and_a_terminated_supernode(tmp_path: Path,
                                                                  built_app: BuiltApp) -> None:
    """SIGKILL partition 2's SuperNode and restart it (same partition and state-dir): it
    rejoins from its checkpoint. SIGTERM partition 3's SuperNode for good: the run completes
    without it. SuperNode 0 hosts partitions 0 and 1 and stays."""
    num_nodes, num_rounds = 4, 6
    hosts = ["0-1", "2", "3"]  # partition-ids of SuperNode 0, 1, 2
    state = {i: tmp_path / f"state-{i}" for i in range(len(hosts))}
    run_dir = tmp_path / "runs" / "survivor"
    with loopback_fleet(tmp_path / "fleet", len(hosts),
                        node_config=lambda i: f"state-dir='{state[i]}' "
                                              f"partition-ids='{hosts[i]}'") as fleet:
        runner = fleet.start_flwr("flwr-run", [
            "run", str(built_app.source), fleet.connection, "--stream",
            "--run-config", f"num-nodes={num_nodes} num-rounds={num_rounds} max-staleness=2 "
                            f"node-wait-timeout=120 round-timeout=30 "
                            f"output-dir='{run_dir.parent}' run-name='{run_dir.name}'"])
        wait_until(lambda: len(read_rows(run_dir)) >= 2 or runner.poll() is not None, 240,
                   "no row 2")
        assert runner.poll() is None, fleet.log("flwr-run")[-3000:]
        fleet.processes["supernode-1"].kill()
        fleet.processes["supernode-1"].wait(timeout=30)
        fleet.start_supernode("supernode-1-restarted", 1, len(hosts),
                              node_config=f"state-dir='{state[1]}' partition-ids='2'")
        fleet.processes["supernode-2"].terminate()
        fleet.processes["supernode-2"].wait(timeout=30)
        assert runner.wait(timeout=600) == 0, fleet.log("flwr-run")[-3000:]
        serverapp_log = fleet.log("flwr-run")
        restarted_log = fleet.log("supernode-1-restarted")
    assert fleet.leftovers() == [], "processes left running"

    rows = read_rows(run_dir)
    assert [row["round"] for row in rows] == list(range(num_rounds + 1)), serverapp_log[-3000:]
    replied = [row["nodes_replied"] for row in rows]
    missing = [row["partitions_missing"] for row in rows]
    print(f"\nnodes replied per row: {replied}; missing: {missing}; "
          f"stale: {[row['partitions_stale'] for row in rows]}")
    assert replied[:2] == [num_nodes] * 2
    # partition 2 dips and comes back; partition 3 is gone for good
    assert any(2 in m for m in missing) and 2 not in missing[-1] and 2 not in missing[-2]
    assert all(3 in m for m in missing[3:])
    # partition 2 learns again after rejoining (from its checkpoint: the log check below). Its
    # label-skewed data alone gives about 3 x chance; with the default degrees (near-linear
    # merges, as D-PSGD) a skewed node on this sparse three-node graph catches up with the
    # others only slowly (measured: 0.31 against 0.69 three rounds after rejoining)
    assert "3" not in rows[-1]["accuracy"] and rows[-1]["accuracy"]["2"] > 2 * CHANCE
    assert all(set(row["accuracy"]) == {str(p) for p in range(num_nodes)} - set(map(str, m))
               for row, m in zip(rows, missing))
    assert 3 in rows[-1]["partitions_stale"]  # too old to route after max-staleness=2
    assert rows[-1]["accuracy_mean"] > 5 * CHANCE
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] is False and summary["rounds_completed"] == num_rounds
    assert "partition 2 moves from node" in serverapp_log or "partition 2 joins" in serverapp_log
    assert "partition 2 resumes from its checkpoint" in restarted_log, restarted_log[-3000:]
