"""Membership through the real ClientApp on an in-memory grid: waiting for the partitions
before round 1, and nodes that die, come back under a new node id, or claim a partition twice,
nodes hosting one partition or several (the real-fleet versions are in tests/fleet/)."""

from __future__ import annotations

import logging

import pytest

from flwr_hyperprism.client.app import app as client_app
from flwr_hyperprism.client.app import make_client_app
from flwr_hyperprism.orchestration.membership import wait_for_partitions
from flwr_hyperprism.server.app import run
from flwr_hyperprism.setup.config import RunConfig
from tests.harness import ElasticGrid, LocalGrid
from tests.variants import metrics_rows

NODES = {1000 + pid: (pid, 4) for pid in range(4)}


def messages(caplog, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


@pytest.mark.parametrize("checkpoints", [False, True], ids=["routed-model", "node-checkpoint"])
def test_a_node_that_dies_and_comes_back_under_a_new_id_rejoins_its_partition(
        tmp_path, caplog, checkpoints):
    config = RunConfig(num_nodes=4, num_rounds=8, density=1.0, eval_size=500,
                       output_dir=str(tmp_path), run_name="run", node_wait_timeout=5.0,
                       max_staleness=2,
                       state_dir=str(tmp_path / "state") if checkpoints else "")
    # partition 2's node dies before round-trip 3 (its message is answered by the SuperLink)
    # and a new node for partition 2 connects before round-trip 5
    grid = ElasticGrid(make_client_app(), NODES, {(3, 0): [("leave", 1002)],
                                                  (5, 0): [("join", 2002, 2)]})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run(grid, config)
    rows = metrics_rows(tmp_path / "run")
    # row r comes from round-trip r + 1: partition 2 misses round-trips 3..6; the new node is
    # asked for its partition in round-trip 6 and is bound from round-trip 7 on
    assert [r["nodes_replied"] for r in rows] == [4, 4, 3, 3, 3, 3, 4, 4, 4]
    assert [r["partitions_missing"] for r in rows] == [[]] * 2 + [[2]] * 4 + [[]] * 3
    assert all(set(r["accuracy"]) == ({"0", "1", "3"} if r["partitions_missing"] else
                                      {"0", "1", "2", "3"}) for r in rows)
    # its model from round 2 misses rounds 3, 4, ...: not routed once it missed > 2
    assert [r["partitions_stale"] for r in rows] == [[]] * 5 + [[2]] * 2 + [[]] * 2
    logged = messages(caplog)
    # the SuperLink's error reply (signed with its own id) counts for partition 2
    assert any("round 3: node 1002 (partition 2) failed: Node Unavailable" in m for m in logged)
    assert any("partition 2 lost its node 1002" in m for m in logged)
    assert any("round 7: partition 2 joins on node 2002" in m for m in logged)
    resumed_from = [m for m in logged if "partition 2 resumes from its checkpoint" in m or
                    "partition 2 has no state of its own" in m]
    assert len(resumed_from) == 1
    assert ("checkpoint of round 2 in" in resumed_from[0]) == checkpoints
    assert rows[-1]["accuracy"]["2"] > 0.5
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"complete": false' in summary and '"2": 5' in summary


def test_a_second_node_claiming_a_live_partition_stays_idle(tmp_path, caplog):
    config = RunConfig(num_nodes=4, num_rounds=4, density=1.0, eval_size=500,
                       output_dir=str(tmp_path), run_name="run", node_wait_timeout=5.0)
    grid = ElasticGrid(make_client_app(), NODES, {(2, 0): [("join", 2001, 1)]})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run(grid, config)
    rows = metrics_rows(tmp_path / "run")
    assert [r["nodes_replied"] for r in rows] == [4] * 5
    idle = [m for m in messages(caplog) if "node 2001 also claims partition 1" in m]
    assert len(idle) == 1 and "held by node 1001, which replies" in idle[0]
    assert grid.contexts[2001].state.array_records == {}  # it never got a train message


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
    with pytest.raises(RuntimeError, match=r"^partitions 2 of num-nodes=3 have no node: 2 node"
                       r"\(s\) host 2 partitions after node-wait-timeout=0.3s; start more "
                       r"SuperNodes or give them those partitions \(node config "
                       r"partition-ids\)$"):
        wait_for_partitions(grid, 3, timeout=0.3)


def test_wait_for_partitions_maps_each_partition_to_the_node_that_hosts_it():
    # 2 SuperNodes for 5 partitions: each hosts its share (partition-id k: k, k + 2, ...)
    grid = LocalGrid(client_app, {5: (0, 2), 6: (1, 2)})
    config = RunConfig(num_nodes=5)
    mapping = wait_for_partitions(grid, 5, timeout=1.0, run_config=config)
    assert mapping == {0: 5, 1: 6, 2: 5, 3: 6, 4: 5}
    # listed partitions (node config partition-ids) over the share
    grid.contexts[5].node_config["partition-ids"] = "0-1,4"
    grid.contexts[6].node_config["partition-ids"] = "2-3"
    mapping = wait_for_partitions(grid, 5, timeout=1.0, run_config=config)
    assert mapping == {0: 5, 1: 5, 2: 6, 3: 6, 4: 5}


@pytest.mark.parametrize("lists, message", [
    ({5: "0-1", 6: "5"}, r"^partitions 2-4, 6 of num-nodes=7 have no node: 2 node\(s\) host "
                         r"3 partitions after"),
    ({5: "0-3", 6: "3-6"}, r"partition id 3 is claimed by nodes 5 and 6; .*partition-ids"),
    ({5: "0-3", 6: "4-9"}, r"partition 1 \(node 6\) cannot start: ValueError: node config "
                           r"partition-ids='4-9' names partitions \[7, 8, 9\] outside 0..6"),
])
def test_wait_for_partitions_names_the_partitions_missing_or_claimed_twice(lists, message):
    grid = LocalGrid(client_app, {5: (0, 2), 6: (1, 2)})
    for nid, listed in lists.items():
        grid.contexts[nid].node_config["partition-ids"] = listed
    with pytest.raises(RuntimeError, match=message):
        wait_for_partitions(grid, 7, timeout=0.3, run_config=RunConfig(num_nodes=7))


def test_a_partition_outside_the_run_is_refused():
    # a plug-in node's answer (no partition-ids): its partition-id must be one of num-nodes
    grid = LocalGrid(client_app, {5: (0, 3), 6: (4, 3)})
    with pytest.raises(RuntimeError, match=r"node 6 hosts partitions \[4\], outside 0..2 "
                                           r"\(num-nodes=3\)"):
        wait_for_partitions(grid, 3, timeout=1.0)


def test_a_node_hosting_two_partitions_that_dies_and_comes_back_rejoins_both(tmp_path, caplog):
    config = RunConfig(num_nodes=4, num_rounds=6, density=1.0, eval_size=200,
                       output_dir=str(tmp_path), run_name="run", node_wait_timeout=5.0)
    # 2 SuperNodes for 4 partitions: node 1001 hosts partitions 1 and 3; it dies before
    # round-trip 3 and a new one with its partition-id connects before round-trip 4
    grid = ElasticGrid(make_client_app(), {1000: (0, 2), 1001: (1, 2)},
                       {(3, 0): [("leave", 1001)], (4, 0): [("join", 2001, 1)]})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run(grid, config)
    rows = metrics_rows(tmp_path / "run")
    # asked for its partitions in round-trip 5, bound from round-trip 6 on
    assert [r["nodes_replied"] for r in rows] == [4, 4, 2, 2, 2, 4, 4]
    assert [r["partitions_missing"] for r in rows] == [[]] * 2 + [[1, 3]] * 3 + [[]] * 2
    logged = messages(caplog)
    assert any("partition 1 lost its node 1001" in m for m in logged)
    assert any("partition 3 lost its node 1001" in m for m in logged)
    assert any("round 6: partition 1 joins on node 2001" in m for m in logged)
    assert any("round 6: partition 3 joins on node 2001" in m for m in logged)
    restarted = [m for m in logged if "has no state of its own" in m]  # one per partition
    assert len(restarted) == 2 and any("partition 1 has no state of its own" in m
                                       for m in restarted)
    assert any("partition 3 has no state of its own" in m for m in restarted)
    assert rows[-1]["accuracy"].keys() == {"0", "1", "2", "3"}
