"""Membership: which Flower node serves which partitions, as nodes leave, join and restart.

A node hosts one partition or several (its node group: ``partition-ids`` in its answer).
Before round 1 ``wait_for_partitions`` asks every connected node for its partitions until all
``num-nodes`` partitions are there. During the run ``Membership.refresh`` follows the
federation before each round-trip: a partition whose node disconnected is unbound (its latest
model stays routed while it is fresh enough); a node not seen before is asked for its
partitions (the answer is read at a later round-trip) and bound to each that has no live node.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from flwr_hyperprism.messages.protocol import INFO_KEY, RUN_KEY, record_int, run_record
from flwr_hyperprism.setup.config import RunConfig

from .transport import send_and_receive

log = logging.getLogger("flwr")


class Membership:
    """The binding of partitions to Flower node ids, and which nodes hold their state.

    Attributes
    ----------
    node_ids : partition id -> the node bound to it (partitions without a node are absent; a
        node may serve several)
    in_sync : partitions whose node holds the state behind the partition's latest routed
        model (a node that failed, was silent or just (re)joined does not, and is sent that
        model to restart from)
    """

    def __init__(self, query_type: str = "query.info") -> None:
        self.query_type = query_type  # the message type of partition queries
        self.node_ids: dict[int, int] = {}
        self.in_sync: set[int] = set()
        self._claims: dict[int, tuple[int, ...] | None] = {}  # node id -> its partitions
        # (node id, partition): the partition moved away from that node, or the node claims a
        # partition another node serves
        self._retired: set[tuple[int, int]] = set()
        self._joining: dict[str, int] = {}  # message id of a pending partition query -> node

    def bind(self, partitions: dict[int, int], in_sync: bool) -> None:
        """Bind {partition: node id} (before round 1); ``in_sync``: the nodes hold their
        partitions' state already (a fresh run's nodes start from the initial model)."""
        self.node_ids = dict(partitions)
        self._claims = {}
        for pid, nid in sorted(partitions.items()):
            self._claims[nid] = (*(self._claims.get(nid) or ()), pid)
        self._retired, self._joining = set(), {}
        self.in_sync = set(partitions) if in_sync else set()

    def partitions_on(self, node_id: int) -> tuple[int, ...]:
        """The partitions bound to ``node_id``."""
        return tuple(sorted(pid for pid, nid in self.node_ids.items() if nid == node_id))

    def replied(self, addressed: set[int], replied: set[int]) -> None:
        """After an exchange: the partitions that replied hold the state behind their new
        latest model; the others that were addressed may not."""
        self.in_sync = (self.in_sync - addressed) | replied

    def refresh(self, grid: Grid, round_: int, config: RunConfig) -> None:
        """Follow the federation before a round-trip of round ``round_``: nodes that left,
        nodes that joined.

        A node that claims an unbound partition, or one whose node did not reply to its last
        message, is bound to it (a restarted SuperNode comes back under a new node id while
        the SuperLink may still list the old one); a node that claims a partition held by a
        node that replies stays idle (a duplicate), with one warning.
        """
        online = set(grid.get_node_ids())
        for partition, nid in sorted(self.node_ids.items()):
            if nid not in online:
                log.warning("round %s: partition %s lost its node %s (disconnected)", round_,
                            partition, nid)
                del self.node_ids[partition]
                self.in_sync.discard(partition)
        self._claims = {nid: pid for nid, pid in self._claims.items() if nid in online}
        self._read_partition_answers(grid, round_, config.num_nodes)
        new = sorted(online - set(self._claims) - set(self._joining.values()))
        if new:
            queries = [partition_query(nid, self.query_type, config) for nid in new]
            self._joining.update(zip(grid.push_messages(queries), new))
        for nid, pids in sorted(self._claims.items()):
            for pid in pids or ():
                self._claim(nid, pid, round_)

    def _claim(self, nid: int, pid: int, round_: int) -> None:
        """Bind ``pid`` to node ``nid``, which claims it, unless its node replies."""
        if (nid, pid) in self._retired or self.node_ids.get(pid) == nid:
            return
        holder = self.node_ids.get(pid)
        if holder is not None and pid in self.in_sync:
            log.warning("round %s: node %s also claims partition %s, held by node %s, which "
                        "replies; node %s stays idle for it", round_, nid, pid, holder, nid)
            self._retired.add((nid, pid))
            return
        log.warning("round %s: partition %s %s on node %s", round_, pid,
                    "joins" if holder is None else f"moves from node {holder}", nid)
        if holder is not None:
            self._retired.add((holder, pid))
        self.node_ids[pid] = nid
        self.in_sync.discard(pid)

    def _read_partition_answers(self, grid: Grid, round_: int, num_nodes: int) -> None:
        if not self._joining:
            return
        for reply in grid.pull_messages(list(self._joining)):
            nid = self._joining.pop(reply.metadata.reply_to_message_id, None)
            if nid is None:
                continue
            if reply.has_error():  # e.g. it went away again: asked anew if it comes back
                log.warning("round %s: node %s did not say its partition: %s", round_, nid,
                            reply.error.reason)
                continue
            try:
                self._claims[nid] = partition_answer(reply, num_nodes)
            except RuntimeError as err:
                log.error("round %s: node %s cannot join: %s", round_, nid, err)
                self._claims[nid] = None


def partition_query(node_id: int, message_type: str, run_config: RunConfig | None
                    ) -> Message:
    """A request for a node's partition id (with the run config, so that the node can check
    that it can load its data)."""
    content = RecordDict({INFO_KEY: ConfigRecord()})
    if run_config is not None:
        content[RUN_KEY] = run_record(run_config)
    return Message(content, dst_node_id=node_id, message_type=message_type)


def _node_count(messages: list[Message]) -> str:
    return f"{len(messages)} node{'s' if len(messages) != 1 else ''}"


def wait_for_partitions(grid: Grid, num_nodes: int, timeout: float,
                        message_type: str = "query.info", run_config: RunConfig | None = None,
                        poll: float = 0.2, report_every: float = 10.0) -> dict[int, int]:
    """Wait until nodes hosting every partition 0..num_nodes-1 are connected.

    Asks every node (a ``message_type`` message marked ``INFO_KEY``, with ``run_config`` as
    ``RUN_KEY`` so a node can list its partitions and check that it can load their data) for
    its partitions until it answers (``partition_answer``); logs how many are there every
    ``report_every`` seconds. Returns {partition id: node id}. Raises RuntimeError on a
    mismatch with the federation, on a node that cannot start (e.g. its data are missing), on
    two nodes claiming one partition, or when the partitions are not all there within
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + report_every
    partitions: dict[int, int] = {}
    answered: set[int] = set()
    while True:
        unknown = [nid for nid in grid.get_node_ids() if nid not in answered]
        if unknown:
            queries = [partition_query(nid, message_type, run_config) for nid in unknown]
            remaining = max(deadline - time.monotonic(), poll)
            _, replies = send_and_receive(grid, queries, remaining, "partition query",
                                          waiting_for=_node_count)
            for reply in replies:
                if reply.has_error():
                    raise RuntimeError(f"node {reply.metadata.src_node_id} did not say its "
                                       f"partition: {reply.error.reason}")
                node = reply.metadata.src_node_id
                for pid in partition_answer(reply, num_nodes):
                    if pid in partitions:
                        first, second = sorted((partitions[pid], node))
                        raise RuntimeError(
                            f"partition id {pid} is claimed by nodes {first} and "
                            f"{second}; give every SuperNode its own partition-id (or "
                            f"partition-ids)")
                    partitions[pid] = node
                answered.add(node)
        if sorted(partitions) == list(range(num_nodes)):
            return partitions
        if time.monotonic() > deadline:
            missing = sorted(set(range(num_nodes)) - set(partitions))
            raise RuntimeError(
                f"partitions {_ranges(missing)} of num-nodes={num_nodes} have no node: "
                f"{len(answered)} node(s) host {len(partitions)} partitions after "
                f"node-wait-timeout={timeout}s; start more SuperNodes or give them those "
                f"partitions (node config partition-ids)")
        if time.monotonic() >= next_report:
            log.info("waiting for nodes: %s of num-nodes=%s partitions hosted (up to %.0fs "
                     "more)", len(partitions), num_nodes, deadline - time.monotonic())
            next_report += report_every
        time.sleep(poll)


def _ranges(pids: list[int]) -> str:
    """'0-3, 7' for [0, 1, 2, 3, 7]."""
    spans: list[list[int]] = []
    for pid in pids:
        if spans and pid == spans[-1][1] + 1:
            spans[-1][1] = pid
        else:
            spans.append([pid, pid])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def federation_size(grid: Grid, timeout: float, message_type: str = "query.info",
                    poll: float = 0.5) -> int:
    """num-partitions as the federation's nodes report it (the first node that answers)."""
    deadline = time.monotonic() + timeout
    while True:
        queries = [partition_query(nid, message_type, None) for nid in grid.get_node_ids()]
        if queries:
            _, replies = send_and_receive(grid, queries, max(deadline - time.monotonic(), poll),
                                          "partition query", waiting_for=_node_count)
            for reply in replies:
                info = reply.content.config_records.get("info")
                if not reply.has_error() and info is not None and "num-partitions" in info:
                    return record_int(info, "num-partitions")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no node reported num-partitions within node-wait-timeout="
                               f"{timeout}s: start the SuperNodes, or pass num_nodes")
        time.sleep(poll)


def partition_answer(reply: Message, num_nodes: int) -> tuple[int, ...]:
    """The partitions a node hosts, from its answer to ``partition_query``: its
    ``partition-ids`` (a native node given the run config), else its one ``partition-id`` of
    ``num-partitions`` (a plug-in node: then num-partitions must be num-nodes). RuntimeError
    if the node belongs to another federation or cannot load its data."""
    info = reply.content.config_records.get("info")
    if info is not None and "error" in info:
        listed: Any = info.get("partition-ids") or (
            [info["partition-id"]] if "partition-id" in info else [])
        named = sorted(int(p) for p in listed)
        who = (f"partition{'s' if len(named) != 1 else ''} {_ranges(named)} (node "
               f"{reply.metadata.src_node_id})" if named else f"node {reply.metadata.src_node_id}")
        raise RuntimeError(f"{who} cannot start: {str(info['error'])}")
    try:
        info = reply.content.config_records["info"]
        if "partition-ids" in info:
            listed = info["partition-ids"]
            pids = tuple(int(p) for p in listed)
        else:
            pids = (record_int(info, "partition-id"),)
            total = record_int(info, "num-partitions")
    except (KeyError, TypeError, ValueError) as err:
        raise RuntimeError(f"node {reply.metadata.src_node_id} answered the partition query "
                           f"without partition-ids, or a partition-id and num-partitions "
                           f"({err!r})") from None
    outside = [pid for pid in pids if not 0 <= pid < num_nodes]
    if outside:
        raise RuntimeError(f"node {reply.metadata.src_node_id} hosts partitions {outside}, "
                           f"outside 0..{num_nodes - 1} (num-nodes={num_nodes}): it belongs "
                           f"to another federation or run")
    if "partition-ids" not in info and total != num_nodes:
        raise RuntimeError(
            f"the federation has num-partitions={total} but the run config has "
            f"num-nodes={num_nodes}: pass --run-config 'num-nodes={total}' or start "
            f"{num_nodes} SuperNodes (simulation: --federation-config "
            f"'num-supernodes={num_nodes}')"
        )
    return pids
