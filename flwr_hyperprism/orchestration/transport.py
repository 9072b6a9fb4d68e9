"""Transport: push a round's messages, pull the replies, attribute each reply to its partitions.

A message goes to one node for the partitions it has tasks for (its node group). Replies are
attributed by the id of the message they answer (``reply_to_message_id``), never by their
sender: the SuperLink signs the error reply for an unreachable node with its own id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid

from flwr_hyperprism.messages.protocol import (
    METRICS_KEY,
    MODEL_KEY,
    SHARED_KEY,
    TASK_KEY,
    by_partition,
    partition_key,
    scalar_metrics,
)

log = logging.getLogger("flwr")


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                     label: str, waiting_for: Callable[[list[Message]], str] | None = None,
                     max_poll: float = 0.1, report_every: float = 5.0
                     ) -> tuple[dict[str, Message], list[Message]]:
    """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds pass.

    Like ``Grid.send_and_receive``, but polls every 5 ms growing to ``max_poll`` seconds: the
    deployed Grid sleeps 3 s between pulls, longer than a whole round of a small model. Every
    ``report_every`` seconds it logs "<label>: <n> of <m> replies after <s>s", with
    ``waiting_for(the messages still unanswered)`` (e.g. their partitions) when given.
    Returns {message id: message as sent} and the replies.
    """
    messages = list(messages)
    sent = dict(zip(grid.push_messages(messages), messages))
    pending = set(sent)
    begun = time.monotonic()
    deadline, next_report = begun + timeout, begun + report_every
    replies: list[Message] = []
    poll = 0.005
    while pending:
        received = list(grid.pull_messages(pending))
        replies.extend(received)
        pending.difference_update(m.metadata.reply_to_message_id for m in received)
        now = time.monotonic()
        if not pending or now >= deadline:
            break
        if now >= next_report:
            missing = f"; waiting for {waiting_for([sent[m] for m in pending])}" \
                if waiting_for is not None else ""
            log.info("%s: %s of %s replies after %.0fs%s (up to %.0fs more)", label,
                     len(sent) - len(pending), len(sent), now - begun, missing, deadline - now)
            next_report += report_every
        time.sleep(poll)
        poll = min(2 * poll, max_poll)
    return sent, replies


def reply_fault(reply: Message, partition: int,
                records: tuple[Mapping[str, object], Mapping[str, object]] | None = None
                ) -> str | None:
    """Why a train reply carries no usable result for ``partition`` (None if it does).
    ``records``: the reply's (array records, metric records), when the caller has them (each
    access of ``RecordDict.array_records`` views every record: once per reply, not per
    partition)."""
    if reply.has_error():
        return reply.error.reason
    shared, metrics = partition_key(SHARED_KEY, partition), partition_key(METRICS_KEY, partition)
    if not reply.has_content():
        return f"the reply has no {shared!r} and {metrics!r} records"
    arrays, metric_records = records or (reply.content.array_records,
                                         reply.content.metric_records)
    if shared not in arrays or metrics not in metric_records:
        return f"the reply has no {shared!r} and {metrics!r} records"
    return None


def partition_list(partitions: Iterable[int]) -> str:
    """``partitions 3, 7, 12`` (sorted), for log lines."""
    ids = sorted(partitions)
    return f"partition{'s' if len(ids) != 1 else ''} {', '.join(map(str, ids))}"


@dataclass
class Exchange:
    """One exchange's replies, attributed to the partitions their messages went to.

    Attributes
    ----------
    addressed : message id -> the partitions it was sent for, of every message sent
    replies : partition -> the reply to its message (an error reply too: see ``reply_fault``)
    """

    addressed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    replies: dict[int, Message] = field(default_factory=dict)

    @property
    def partitions(self) -> set[int]:
        """Every partition a message was sent for."""
        return {pid for pids in self.addressed.values() for pid in pids}

    @property
    def silent(self) -> list[int]:
        """Partitions that were sent a message and got no reply."""
        return sorted(self.partitions - set(self.replies))


def addressed_partitions(message: Message, hosted: Callable[[int], Iterable[int]]
                         ) -> tuple[int, ...]:
    """The partitions ``message`` is for: those it has tasks for (a train message), else
    ``hosted(its destination node)``."""
    tasks = by_partition(message.content.config_records, TASK_KEY)
    return tuple(sorted(tasks)) if tasks else tuple(hosted(message.metadata.dst_node_id))


def exchange(grid: Grid, messages: Iterable[Message], hosted: Callable[[int], Iterable[int]],
             timeout: float, label: str) -> Exchange:
    """Send ``messages`` and attribute the replies to the partitions each message is for
    (``addressed_partitions``; ``hosted``: node id -> the partitions bound to it); a reply to a
    message this exchange did not send is logged and ignored."""
    messages = list(messages)
    partitions = {id(m): addressed_partitions(m, hosted) for m in messages}
    sent, replies = send_and_receive(
        grid, messages, timeout, label,
        waiting_for=lambda left: partition_list(pid for m in left for pid in partitions[id(m)]))
    result = Exchange({mid: partitions[id(m)] for mid, m in sent.items()})
    for reply in replies:
        pids = result.addressed.get(reply.metadata.reply_to_message_id)
        if pids is None:
            log.warning("%s: ignored a reply to unknown message %s from node %s", label,
                        reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        else:
            result.replies.update(dict.fromkeys(pids, reply))
    return result


@dataclass
class TrainResults:
    """What the replying nodes of a train exchange sent, per partition: their new shared
    tensors (to route), their metrics and, when asked, their evaluated model."""

    shared: dict[int, ArrayRecord] = field(default_factory=dict)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    models: dict[int, ArrayRecord] = field(default_factory=dict)


def train_results(replies: Exchange, node_ids: Mapping[int, int], label: str,
                  timeout: float, num_nodes: int) -> TrainResults:
    """The usable results of a train exchange. A node that failed (an error reply, e.g. the
    SuperLink's for an unreachable node) or did not reply in time is logged, once per node
    and reason (a node group's error reply is one line naming its partitions)."""
    results = TrainResults()
    records: dict[int, tuple[Mapping[str, ArrayRecord], Mapping[str, MetricRecord]]] = {}
    faults: dict[tuple[int | None, str], list[int]] = {}
    for pid, reply in sorted(replies.replies.items()):
        if not reply.has_error() and reply.has_content() and id(reply) not in records:
            records[id(reply)] = (reply.content.array_records, reply.content.metric_records)
        fault = reply_fault(reply, pid, records.get(id(reply)))
        if fault is not None:
            faults.setdefault((node_ids.get(pid), fault), []).append(pid)
            continue
        arrays, metrics = records[id(reply)]
        results.shared[pid] = arrays[partition_key(SHARED_KEY, pid)]
        if partition_key(MODEL_KEY, pid) in arrays:
            results.models[pid] = arrays[partition_key(MODEL_KEY, pid)]
        results.metrics[pid] = scalar_metrics(metrics[partition_key(METRICS_KEY, pid)])
    for (node, fault), pids in faults.items():
        log.error("%s: node %s (%s) failed: %s", label, node, partition_list(pids), fault)
    if replies.silent:
        log.error("%s: no reply within round-timeout=%ss from %s", label, timeout,
                  partition_list(replies.silent))
    if len(results.metrics) < num_nodes:
        log.warning("%s: %s of %s partitions replied; the others keep their last routed model",
                    label, len(results.metrics), num_nodes)
    return results
