"""Transport: replies attributed to the partition their message went to, silent nodes named
by partition (not by node id), failures told apart from results."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_hyperprism.orchestration.transport import (
    exchange,
    partition_list,
    send_and_receive,
    train_results,
)
from tests.harness import ElasticGrid, LocalGrid

NODES = {1000 + 7 * pid: (pid, 3) for pid in range(3)}  # node ids unrelated to partitions
PARTITION_OF = {nid: pid for nid, (pid, _) in NODES.items()}


def echo_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = float(context.node_config["partition-id"])
        return Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((1,), pid)}),
                                   "metrics": MetricRecord({"pid": pid})}), reply_to=msg)

    return app


class SilentGrid(LocalGrid):
    """A LocalGrid whose node ``silent`` never answers."""

    def __init__(self, app: ClientApp, silent: int) -> None:
        super().__init__(app, NODES)
        self.silent = silent

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids
                if i in self.replies and self.replies[i].metadata.src_node_id != self.silent]


def train_messages() -> list[Message]:
    return [Message(RecordDict(), dst_node_id=nid, message_type="train") for nid in NODES]


def test_replies_are_attributed_by_the_message_they_answer_even_when_signed_by_another_id():
    grid = ElasticGrid(echo_app(), NODES, {})
    del grid.contexts[1007]  # partition 1's node is gone: the "SuperLink" answers for it
    sent = exchange(grid, train_messages(), PARTITION_OF, timeout=5.0, label="round 1")
    assert sorted(sent.replies) == [0, 1, 2] and sent.silent == []
    assert sent.replies[1].has_error() and sent.replies[1].metadata.src_node_id == 1
    results = train_results(sent, {pid: nid for nid, pid in PARTITION_OF.items()}, "round 1",
                            5.0, 3)
    assert sorted(results.metrics) == [0, 2]
    assert results.metrics[2]["pid"] == 2.0 and float(results.shared[2]["w"].numpy()[0]) == 2.0


def test_a_silent_node_is_named_by_its_partition_while_waiting_and_after(caplog):
    grid = SilentGrid(echo_app(), silent=1014)  # partition 2
    with caplog.at_level(logging.INFO, logger="flwr"):
        sent = exchange(grid, train_messages(), PARTITION_OF, timeout=0.3, label="round 4")
        results = train_results(sent, {pid: nid for nid, pid in PARTITION_OF.items()},
                                "round 4", 0.3, 3)
    assert sent.silent == [2] and sorted(results.metrics) == [0, 1]
    logged = [r.getMessage() for r in caplog.records]
    assert "round 4: no reply within round-timeout=0.3s from partition 2" in logged
    assert "round 4: 2 of 3 partitions replied; the others keep their last routed model" \
        in logged
    assert not any("1014" in line for line in logged)  # counts and partitions, no node ids


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
