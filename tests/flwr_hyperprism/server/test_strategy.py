"""The Flower Strategy adapter: the messages it sends, its plug-in options, and the hooks of
Flower's own loop, which it replaces by ``start``.

(Runs through it: ``test_apps.py`` (a Grid run equals the in-process run, routing is exact),
``orchestration/test_membership.py`` (nodes that leave and rejoin), ``test_faults.py``.)
"""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from flwr_hyperprism.client.app import app as client_app
from flwr_hyperprism.messages.protocol import (
    NEIGHBOUR_PREFIX,
    OWN_KEY,
    REPORT_KEY,
    RUN_KEY,
    STAGE_KEY,
    message_tasks,
    partition_key,
)
from flwr_hyperprism.server.app import initial_model
from flwr_hyperprism.server.plugin import PluginStrategy, decentralized_strategy
from flwr_hyperprism.server.strategy import make_strategy
from flwr_hyperprism.setup.config import RunConfig
from tests.harness import LocalGrid


def opened(config: RunConfig, tmp_path, nodes: dict[int, int] | None = None):
    """A strategy ready for round 1, partition p bound to node ``nodes[p]`` (1000 + p)."""
    strategy = make_strategy(config, tmp_path / "run")
    strategy.loop.open(initial_model(config), ArrayRecord)
    strategy.members.bind(nodes or {pid: 1000 + pid for pid in range(config.num_nodes)},
                          in_sync=True)
    return strategy


def with_config(contents) -> list[int]:
    """The partitions whose node's message carries the run config."""
    return sorted(pid for content in contents.values() if RUN_KEY in content
                  for pid in message_tasks(content))


def test_train_messages_go_to_bound_nodes_with_their_task_stage_and_report_request(tmp_path):
    config = RunConfig(num_nodes=4, density=1.0, algorithm="mudag", eval_size=200)
    strategy = opened(config, tmp_path)
    asked = ConfigRecord({STAGE_KEY: 1, REPORT_KEY: True, "lr-scale": 0.5})
    messages = list(strategy.configure_train(3, ArrayRecord(), asked, LocalGrid(client_app, {})))
    assert [m.metadata.dst_node_id for m in messages] == [1000, 1001, 1002, 1003]
    assert {m.metadata.message_type for m in messages} == {"train.mudag"}
    assert {m.metadata.group_id for m in messages} == {"3.1"}
    for pid, message in enumerate(messages):  # a node of one partition: that one task
        tasks = message_tasks(message.content)
        assert list(tasks) == [pid] and tasks[pid].stage == 1 and tasks[pid].round == 3
    first = messages[0].content
    assert dict(first.config_records["config"]) == {"lr-scale": 0.5}  # the rest passed on
    assert REPORT_KEY in first  # its node holds its state: no own model
    assert not any(key.startswith(OWN_KEY) for key in first)


def test_a_node_hosting_two_partitions_gets_one_message_with_both_tasks(tmp_path):
    config = RunConfig(num_nodes=4, density=1.0)
    strategy = opened(config, tmp_path, {0: 1000, 1: 1002, 2: 1000, 3: 1003})
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(),
                                             LocalGrid(client_app, {})))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1000, 1002, 1003]
    by_node = {m.metadata.dst_node_id: m.content for m in messages}
    group = by_node[1000]
    tasks = message_tasks(group)
    assert sorted(tasks) == [0, 2]
    assert tasks == {pid: task for pid, task in strategy.loop.tasks(1, 0).items()
                     if pid in (0, 2)}
    # every neighbour model either task needs, once, the very record routed (density 1: the
    # other three partitions of each, 0 and 2 among them)
    latest = strategy.loop.routing.latest
    assert sorted(k for k in group.array_records) == [f"{NEIGHBOUR_PREFIX}{j}" for j in range(4)]
    assert all(group[f"{NEIGHBOUR_PREFIX}{j}"] is latest[j] for j in range(4))
    assert list(message_tasks(by_node[1002])) == [1]
    assert list(message_tasks(by_node[1003])) == [3]
    assert all(RUN_KEY in content for content in by_node.values())  # round 1: to every node
    # the reply of one of the group's partitions is missing: its node may have lost its state
    strategy.members.replied({0, 1, 2, 3}, {0, 1, 3})
    again = strategy.train_contents(2, 0, ConfigRecord())
    assert sorted(again) == [1000, 1002, 1003] and with_config(again) == [0, 2]
    assert set(again[1000].array_records) == {*(f"{NEIGHBOUR_PREFIX}{j}" for j in range(4)),
                                             partition_key(OWN_KEY, 2)}


def test_a_partition_without_a_node_gets_no_message_and_a_resynced_one_gets_its_model(
        tmp_path):
    strategy = opened(RunConfig(num_nodes=3, density=1.0), tmp_path)
    strategy.members.bind({0: 1000, 2: 1002}, in_sync=False)  # partition 1 has no node
    contents = strategy.train_contents(1, 0, ConfigRecord())
    assert sorted(contents) == [1000, 1002]
    assert [list(message_tasks(c)) for _, c in sorted(contents.items())] == [[0], [2]]
    latest = strategy.loop.routing.latest
    assert contents[1000][partition_key(OWN_KEY, 0)] is latest[0]
    assert contents[1002][partition_key(OWN_KEY, 2)] is latest[2]
    assert partition_key(OWN_KEY, 2) not in contents[1000]  # only its own


def test_plug_in_options_are_constructor_arguments():
    strategy = decentralized_strategy("dpsgd", density=0.3, accuracy_metric="acc", lr_key="eta")
    assert isinstance(strategy, PluginStrategy)
    assert strategy.accuracy_metric == "acc" and strategy.lr_key == "eta"
    assert strategy.num_nodes_from_federation and strategy.config.density == 0.3
    assert strategy.train_message_type == "train" and strategy.members.query_type == "train"


def test_flowers_own_aggregate_hooks_point_to_start():
    strategy = make_strategy(RunConfig(num_nodes=2))
    with pytest.raises(NotImplementedError, match="call start()"):
        strategy.aggregate_train(1, [])
    with pytest.raises(NotImplementedError, match="call start()"):
        strategy.aggregate_evaluate(1, [])


def test_the_run_config_goes_once_per_run_and_again_where_it_may_be_missing(tmp_path):
    strategy = opened(RunConfig(num_nodes=3, density=1.0), tmp_path)

    def sent_config(round_: int) -> list[int]:
        return with_config(strategy.train_contents(round_, 0, ConfigRecord()))

    assert sent_config(1) == [0, 1, 2]
    assert sent_config(2) == []
    strategy.members.replied({0, 1, 2}, {0, 2})  # partition 1 failed: it may have lost it
    assert sent_config(3) == [1]


def test_a_changed_round_config_goes_to_every_node(tmp_path):
    strategy = decentralized_strategy("dpsgd", num_nodes=2, density=1.0)
    strategy.loop.open(initial_model(RunConfig(num_nodes=2)), ArrayRecord)
    strategy.members.bind({0: 1000, 1: 1001}, in_sync=True)
    for lr, expected in ((0.1, [1000, 1001]), (0.1, []), (0.05, [1000, 1001])):
        contents = strategy.train_contents(1, 0, ConfigRecord({"lr": lr}))
        assert sorted(nid for nid, c in contents.items() if RUN_KEY in c) == expected
