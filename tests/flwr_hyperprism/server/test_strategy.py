"""The Flower Strategy adapter: the messages it sends, its plug-in options, and the hooks of
Flower's own loop, which it replaces by ``start``.

(Runs through it: ``test_apps.py`` (a Grid run equals the in-process run, routing is exact),
``orchestration/test_membership.py`` (nodes that leave and rejoin), ``test_faults.py``.)
"""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from flwr_hyperprism.client.app import app as client_app
from flwr_hyperprism.messages.protocol import OWN_KEY, REPORT_KEY, RUN_KEY, STAGE_KEY, record_task
from flwr_hyperprism.server.app import initial_model
from flwr_hyperprism.server.plugin import PluginStrategy, decentralized_strategy
from flwr_hyperprism.server.strategy import make_strategy
from flwr_hyperprism.setup.config import RunConfig
from tests.harness import LocalGrid


def opened(config: RunConfig, tmp_path):
    strategy = make_strategy(config, tmp_path / "run")
    strategy.loop.open(initial_model(config), ArrayRecord)
    strategy.members.bind({pid: 1000 + pid for pid in range(config.num_nodes)}, in_sync=True)
    return strategy


def test_train_messages_go_to_bound_nodes_with_their_task_stage_and_report_request(tmp_path):
    config = RunConfig(num_nodes=4, density=1.0, algorithm="mudag", eval_size=200)
    strategy = opened(config, tmp_path)
    asked = ConfigRecord({STAGE_KEY: 1, REPORT_KEY: True, "lr-scale": 0.5})
    messages = list(strategy.configure_train(3, ArrayRecord(), asked, LocalGrid(client_app, {})))
    assert [m.metadata.dst_node_id for m in messages] == [1000, 1001, 1002, 1003]
    assert {m.metadata.message_type for m in messages} == {"train.mudag"}
    assert {m.metadata.group_id for m in messages} == {"3.1"}
    first = messages[0].content
    assert record_task(first.config_records["hyperprism.task"]).stage == 1
    assert dict(first.config_records["config"]) == {"lr-scale": 0.5}  # the rest passed on
    assert REPORT_KEY in first and OWN_KEY not in first  # its node holds its state


def test_a_partition_without_a_node_gets_no_message_and_a_resynced_one_gets_its_model(
        tmp_path):
    strategy = opened(RunConfig(num_nodes=3, density=1.0), tmp_path)
    strategy.members.bind({0: 1000, 2: 1002}, in_sync=False)  # partition 1 has no node
    contents = strategy.train_contents(1, 0, ConfigRecord())
    assert sorted(contents) == [0, 2] and all(OWN_KEY in c for c in contents.values())


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
        contents = strategy.train_contents(round_, 0, ConfigRecord())
        return sorted(pid for pid, content in contents.items() if RUN_KEY in content)

    assert sent_config(1) == [0, 1, 2]
    assert sent_config(2) == []
    strategy.members.replied({0, 1, 2}, {0, 2})  # partition 1 failed: it may have lost it
    assert sent_config(3) == [1]


def test_a_changed_round_config_goes_to_every_node(tmp_path):
    strategy = decentralized_strategy("dpsgd", num_nodes=2, density=1.0)
    strategy.loop.open(initial_model(RunConfig(num_nodes=2)), ArrayRecord)
    strategy.members.bind({0: 1000, 1: 1001}, in_sync=True)
    for lr, expected in ((0.1, [0, 1]), (0.1, []), (0.05, [0, 1])):
        contents = strategy.train_contents(1, 0, ConfigRecord({"lr": lr}))
        assert sorted(p for p, c in contents.items() if RUN_KEY in c) == expected
