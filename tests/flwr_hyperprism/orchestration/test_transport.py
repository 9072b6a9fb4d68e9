"""Transport: replies attributed to the partitions their message went to (a node may host
several), silent nodes named by partition (not by node id), failures told apart from
results."""

from __future__ import annotations

import logging
from collections.abc import Collection

import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

from flwr_hyperprism.messages.protocol import (
    TASK_KEY,
    message_tasks,
    partition_key,
    reply_content,
    task_record,
)
from flwr_hyperprism.orchestration.transport import (
    exchange,
    partition_list,
    send_and_receive,
    train_results,
)
from strategies.base.rule import NodeTask
from tests.harness import ElasticGrid, LocalGrid

NODES = {1000 + 7 * pid: (pid, 3) for pid in range(3)}  # node ids unrelated to partitions
PARTITION_OF = {nid: pid for nid, (pid, _) in NODES.items()}


def echo_app(drop: Collection[int] = ()) -> ClientApp:
    """Answers a train message for each partition it has a task for (its node config's
    partition without tasks), except the partitions in ``drop``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pids = sorted(message_tasks(msg.content)) or [int(context.node_config["partition-id"])]
        kept = [pid for pid in pids if pid not in drop]
        return Message(reply_content({p: {"w": torch.full((1,), float(p))} for p in kept},
                                     {p: {"pid": float(p)} for p in kept}, {}), reply_to=msg)

    return app


def failing_app() -> ClientApp:
    """Raises on every train message: the grid answers with an error reply."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        raise RuntimeError("injected failure")

    return app


class SilentGrid(LocalGrid):
    """A LocalGrid whose node ``silent`` never answers."""

    def __init__(self, app: ClientApp, silent: int | None,
                 nodes: dict[int, tuple[int, int]] = NODES) -> None:
        super().__init__(app, nodes)
        self.silent = silent

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids
                if i in self.replies and self.replies[i].metadata.src_node_id != self.silent]


def train_message(node_id: int, *partitions: int) -> Message:
    """A train message to ``node_id`` with a task for each of ``partitions``."""
    content = RecordDict({partition_key(TASK_KEY, pid): task_record(NodeTask(1))
                          for pid in partitions})
    return Message(content, dst_node_id=node_id, message_type="train")


def train_messages() -> list[Message]:
    return [train_message(nid, pid) for nid, pid in PARTITION_OF.items()]


def not_asked(node_id: int) -> tuple[int, ...]:
    raise AssertionError(f"train messages name their partitions; node {node_id} was looked up")


def test_replies_are_attributed_by_the_message_they_answer_even_when_signed_by_another_id():
    grid = ElasticGrid(echo_app(), NODES, {})
    del grid.contexts[1007]  # partition 1's node is gone: the "SuperLink" answers for it
    sent = exchange(grid, train_messages(), not_asked, timeout=5.0, label="round 1")
    assert sorted(sent.addressed.values()) == [(0,), (1,), (2,)]
    assert sorted(sent.replies) == [0, 1, 2] and sent.silent == []
    assert sent.replies[1].has_error() and sent.replies[1].metadata.src_node_id == 1
    results = train_results(sent, {pid: nid for nid, pid in PARTITION_OF.items()}, "round 1",
                            5.0, 3)
    assert sorted(results.metrics) == [0, 2]
    assert results.metrics[2]["pid"] == 2.0 and float(results.shared[2]["w"].numpy()[0]) == 2.0


def test_a_silent_node_is_named_by_its_partition_while_waiting_and_after(caplog):
    grid = SilentGrid(echo_app(), silent=1014)  # partition 2
    with caplog.at_level(logging.INFO, logger="flwr"):
        sent = exchange(grid, train_messages(), not_asked, timeout=0.3, label="round 4")
        results = train_results(sent, {pid: nid for nid, pid in PARTITION_OF.items()},
                                "round 4", 0.3, 3)
    assert sent.silent == [2] and sorted(results.metrics) == [0, 1]
    logged = [r.getMessage() for r in caplog.records]
    assert "round 4: no reply within round-timeout=0.3s from partition 2" in logged
    assert "round 4: 2 of 3 partitions replied; the others keep their last routed model" \
        in logged
    assert not any("1014" in line for line in logged)  # counts and partitions, no node ids


def test_a_node_groups_reply_counts_for_each_partition_it_has_records_for(caplog):
    # node 1000 hosts partitions 0 and 1, node 1007 partitions 2 and 3 but answers only for 2
    grid = LocalGrid(echo_app(drop={3}), {1000: (0, 2), 1007: (1, 2)})
    node_ids = {0: 1000, 1: 1000, 2: 1007, 3: 1007}
    with caplog.at_level(logging.INFO, logger="flwr"):
        sent = exchange(grid, [train_message(1000, 1, 0), train_message(1007, 2, 3)],
                        not_asked, timeout=5.0, label="round 2")
        results = train_results(sent, node_ids, "round 2", 5.0, 4)
    assert sorted(sent.addressed.values()) == [(0, 1), (2, 3)]
    assert sent.partitions == {0, 1, 2, 3} and sent.silent == []
    assert sent.replies[0] is sent.replies[1] and sent.replies[2] is sent.replies[3]
    assert sorted(results.metrics) == [0, 1, 2] and sorted(results.shared) == [0, 1, 2]
    for pid in (0, 1, 2):  # each partition gets its own records, not its node-mate's
        assert results.metrics[pid]["pid"] == float(pid)
        assert float(results.shared[pid]["w"].numpy()[0]) == float(pid)
    logged = [r.getMessage() for r in caplog.records]
    assert "round 2: node 1007 (partition 3) failed: the reply has no 'arrays.3' and " \
           "'metrics.3' records" in logged
    assert not any("(partition 2) failed" in line for line in logged)


def test_a_node_groups_error_reply_is_one_log_line_naming_its_partitions(caplog):
    grid = LocalGrid(failing_app(), {1000: (0, 2), 1007: (1, 2)})
    node_ids = {0: 1000, 1: 1000, 2: 1007, 3: 1007}
    with caplog.at_level(logging.INFO, logger="flwr"):
        sent = exchange(grid, [train_message(1000, 1, 0), train_message(1007, 2, 3)],
                        not_asked, timeout=5.0, label="round 2")
        results = train_results(sent, node_ids, "round 2", 5.0, 4)
    assert results.metrics == {}
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 2, failed
    assert failed == [f"round 2: node {node} (partitions {pids}) failed: "
                      f"RuntimeError('injected failure')"
                      for node, pids in ((1000, "0, 1"), (1007, "2, 3"))]


@pytest.mark.parametrize("silent", [None, 1000])
def test_messages_without_tasks_count_for_the_partitions_their_node_hosts(silent):
    # e.g. plug-in mode's evaluate messages: attributed through ``hosted``
    hosted = {1000: (0, 1), 1007: (2,)}
    grid = SilentGrid(echo_app(), silent, {1000: (0, 2), 1007: (1, 2)})
    messages = [Message(RecordDict(), dst_node_id=nid, message_type="train") for nid in hosted]
    sent = exchange(grid, messages, hosted.__getitem__, timeout=0.3, label="round 1")
    assert sorted(sent.addressed.values()) == [(0, 1), (2,)]
    assert sent.silent == ([] if silent is None else [0, 1])
    assert sorted(sent.replies) == ([0, 1, 2] if silent is None else [2])


def test_progress_lines_count_replies_and_name_what_is_missing(caplog):
    grid = SilentGrid(echo_app(), silent=1014)
    with caplog.at_level(logging.INFO, logger="flwr"):
        send_and_receive(grid, train_messages(), 0.25, "round 2", report_every=0.1,
                         waiting_for=lambda left: partition_list(
                             PARTITION_OF[m.metadata.dst_node_id] for m in left))
    progress = [r.getMessage() for r in caplog.records if "replies after" in r.getMessage()]
    assert progress and progress[0].startswith("round 2: 2 of 3 replies after 0s; waiting for "
                                               "partition 2 (up to 0s more)")


def test_partition_lists_read_naturally():
    assert partition_list([7, 3]) == "partitions 3, 7"
    assert partition_list([2]) == "partition 2"
