"""The native ClientApp's own state: the run config it keeps, the node states it saves, the
partitions it hosts."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from flwr_hyperprism.client.app import app as client_app
from flwr_hyperprism.client.app import hosted_partitions, load_state, run_config, save_state
from flwr_hyperprism.messages.protocol import (
    REPORT_KEY,
    RUN_KEY,
    TASK_KEY,
    partition_key,
    run_record,
    task_record,
)
from flwr_hyperprism.setup.config import RunConfig
from strategies import NodeState
from strategies.base.rule import NodeTask
from tests.harness import LocalGrid


def test_a_node_keeps_the_run_config_it_was_sent_and_says_when_it_has_none():
    grid = LocalGrid(client_app, {7: (3, 4), 8: (3, 4)})  # two nodes' contexts
    context, fresh = grid.contexts[7], grid.contexts[8]
    config = RunConfig(num_nodes=4, lr=0.05)
    first = Message(RecordDict({RUN_KEY: run_record(config)}), dst_node_id=7,
                    message_type="train.dpsgd")
    assert run_config(first, context) == config
    later = Message(RecordDict(), dst_node_id=7, message_type="train.dpsgd")
    assert run_config(later, context) == config
    with pytest.raises(ValueError, match="partition 3 got a train message without the run"):
        run_config(later, fresh)


def test_a_saved_node_state_drops_the_groups_the_new_state_no_longer_has():
    # e.g. HyperPrism's "diverged" group: kept, every later merge would stay linear
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={})
    save_state(context, 3, NodeState(3, {"shared": {"w": torch.ones(2)},
                                         "diverged": {"flag": torch.ones(())}}))
    save_state(context, 3, NodeState(4, {"shared": {"w": torch.zeros(2)}}))
    state = load_state(context, 3)
    assert state is not None and state.round == 4 and list(state.tensors) == ["shared"]
    assert torch.equal(state.tensors["shared"]["w"], torch.zeros(2))


def test_the_partitions_of_a_node_keep_their_states_apart():
    # a node hosting partitions 1 and 11 (11 has a prefix of 1's key in common)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={})
    assert load_state(context, 1) is None
    save_state(context, 1, NodeState(2, {"shared": {"w": torch.ones(2)},
                                         "diverged": {"flag": torch.ones(())}}))
    save_state(context, 11, NodeState(5, {"shared": {"w": torch.full((2,), 11.0)}}))
    save_state(context, 1, NodeState(3, {"shared": {"w": torch.zeros(2)}}))  # drops only 1's
    first, second = load_state(context, 1), load_state(context, 11)
    assert first is not None and second is not None and load_state(context, 2) is None
    assert first.round == 3 and list(first.tensors) == ["shared"]
    assert torch.equal(first.tensors["shared"]["w"], torch.zeros(2))
    assert second.round == 5 and list(second.tensors) == ["shared"]
    assert torch.equal(second.tensors["shared"]["w"], torch.full((2,), 11.0))


@pytest.mark.parametrize("node_config, num_nodes, expected", [
    ({"partition-ids": "3"}, 4, (3,)),
    ({"partition-ids": "0-2"}, 4, (0, 1, 2)),
    ({"partition-ids": "0-4, 7,9 ,3"}, 10, (0, 1, 2, 3, 4, 7, 9)),  # spaces, overlaps: a set
    ({"partition-ids": "5,5"}, 6, (5,)),
    # over partition-id/num-partitions, which every SuperNode has
    ({"partition-ids": "2", "partition-id": 0, "num-partitions": 1}, 4, (2,)),
    ({"partition-id": 1, "num-partitions": 4}, 4, (1,)),  # a SuperNode per partition
    ({"partition-id": 1, "num-partitions": 2}, 5, (1, 3)),  # fewer SuperNodes: a share each
    ({"partition-id": 0, "num-partitions": 2}, 5, (0, 2, 4)),
    ({"partition-id": 3, "num-partitions": 4}, 2, ()),  # more SuperNodes than partitions
])
def test_a_node_hosts_its_listed_partitions_else_its_share_of_them(node_config, num_nodes,
                                                                    expected):
    assert hosted_partitions(node_config, num_nodes) == expected


@pytest.mark.parametrize("value, message", [
    ("0-x", r"partition-ids='0-x': '0-x' is neither a partition id nor a range"),
    ("a", r"partition-ids='a': 'a' is neither"),
    ("1,-2", r"partition-ids='1,-2': '-2' is neither"),
    ("2-5", r"partition-ids='2-5' names partitions \[4, 5\] outside 0..3 \(num-nodes=4\)"),
])
def test_a_partition_list_that_does_not_parse_or_fit_names_the_value(value, message):
    with pytest.raises(ValueError, match=message):
        hosted_partitions({"partition-ids": value, "partition-id": 0, "num-partitions": 1}, 4)


def test_a_node_steps_the_partitions_it_has_tasks_for_and_refuses_others():
    # 2 SuperNodes for 4 partitions: node 7 (partition-id 0 of 2) hosts partitions 0 and 2
    grid = LocalGrid(client_app, {7: (0, 2)})
    config = RunConfig(num_nodes=4, eval_size=100)

    def train(*partitions: int) -> Message:
        content = RecordDict({RUN_KEY: run_record(config), REPORT_KEY: ConfigRecord(),
                              **{partition_key(TASK_KEY, pid): task_record(NodeTask(1))
                                 for pid in partitions}})
        [reply] = grid.send_and_receive([Message(content, dst_node_id=7,
                                                 message_type="train.dpsgd")])
        return reply

    reply = train(0, 2)
    assert not reply.has_error()
    assert set(reply.content.array_records) == {"arrays.0", "arrays.2", "model.0", "model.2"}
    assert set(reply.content.metric_records) == {"metrics.0", "metrics.2"}
    state = grid.contexts[7]
    assert {pid: getattr(load_state(state, pid), "round", None) for pid in range(4)} == \
        {0: 1, 1: None, 2: 1, 3: None}
    refused = train(0, 1)  # partition 1 is node 8's
    assert refused.has_error() and "hosts partitions [0, 2], not [1]" in refused.error.reason
