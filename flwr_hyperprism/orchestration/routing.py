"""The routing table: every partition's latest shared tensors, and what each node is sent.

The orchestrator keeps, per partition, the tensors its node last replied with (its model, and
what an algorithm routes with it) and the round they came from. A round's plan is carried out
over the partitions whose latest tensors are fresh enough (``max-staleness``); each node is
sent its task and its neighbours' latest tensors exactly as they were received.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Generic, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flwr_hyperprism.messages.protocol import (
    NEIGHBOUR_PREFIX,
    OWN_KEY,
    REPORT_KEY,
    RUN_KEY,
    TASK_KEY,
    partition_key,
    task_record,
)
from strategies.base.plan import RoutingPlan
from strategies.base.rule import NodeTask, StateDict

Routed = TypeVar("Routed", ArrayRecord, StateDict)  # as received: a record, or in-process a dict


class RoutingTable(Generic[Routed]):
    """Partition id -> latest shared tensors (``latest``) and their round (``received``).

    ``stale`` lists the partitions left out of the last planned round-trip as too old.
    """

    def __init__(self) -> None:
        self.latest: dict[int, Routed] = {}
        self.received: dict[int, int] = {}
        self.stale: list[int] = []

    def start(self, initial: Routed | None, num_nodes: int) -> None:
        """A fresh run: ``initial`` (if any) is every partition's latest model, of round 0."""
        self.latest = dict.fromkeys(range(num_nodes), initial) if initial is not None else {}
        self.received = dict.fromkeys(self.latest, 0)

    def restore(self, latest: Mapping[int, Routed], received: Mapping[int, int]) -> None:
        """A resumed run: the checkpointed latest tensors and their rounds."""
        self.latest, self.received = dict(latest), dict(received)

    def store(self, partition: int, shared: Routed, round_: int) -> None:
        """``partition``'s node replied in round ``round_`` with ``shared``."""
        self.latest[partition] = shared
        self.received[partition] = round_

    def routable(self, round_: int, max_staleness: int) -> set[int]:
        """Partitions whose latest tensors may be routed in round ``round_``: they have missed
        at most ``max_staleness`` rounds (tensors from round t - 1 have missed none)."""
        return {pid for pid in self.latest
                if round_ - 1 - self.received.get(pid, 0) <= max_staleness}

    def tasks(self, plan: RoutingPlan, round_: int, stage: int) -> dict[int, NodeTask]:
        """``plan``'s tasks of round-trip (``round_``, ``stage``) over the routable partitions;
        notes the stale ones in ``stale``."""
        available = self.routable(round_, plan.config.max_staleness)
        self.stale = sorted(set(self.latest) - available)
        return plan.plan_round(round_, available, stage)

    def trained_in(self, round_: int) -> list[int]:
        """Partitions whose latest tensors come from round ``round_``."""
        return sorted(pid for pid, received in self.received.items() if received == round_)


def train_contents(tasks: Mapping[int, NodeTask], node_of: Mapping[int, int],
                   routing: RoutingTable[ArrayRecord], records: Mapping[str, ConfigRecord],
                   run_config: ConfigRecord, in_sync: Collection[int],
                   hold_config: Collection[int], report: bool) -> dict[int, RecordDict]:
    """{node id: the content of its train message} (``train_content``): one message per node
    (``node_of``: partition -> node id) for the tasks of the partitions bound to it. Partitions
    not ``in_sync`` get their own latest model; a node with a partition not in
    ``hold_config`` gets the ``run_config`` (as ``RUN_KEY``)."""
    groups: dict[int, list[int]] = {}
    for pid in sorted(tasks):
        groups.setdefault(node_of[pid], []).append(pid)
    return {nid: train_content({pid: tasks[pid] for pid in pids}, routing,
                               records if all(pid in hold_config for pid in pids)
                               else {**records, RUN_KEY: run_config},
                               [pid for pid in pids if pid not in in_sync], report)
            for nid, pids in groups.items()}


def train_content(tasks: Mapping[int, NodeTask], routing: RoutingTable[ArrayRecord],
                  records: Mapping[str, ConfigRecord], send_own: Collection[int], report: bool
                  ) -> RecordDict:
    """The content of a node's train message for ``tasks`` ({partition: task}).

    Each task (``<TASK_KEY>.<partition>``), ``records`` (the run config, the session that names
    the nodes' checkpoints, the train config passed on), every neighbour's latest model that
    any task needs, once, as ``nbr.<partition>``; for the partitions in ``send_own`` their own
    latest model (``<OWN_KEY>.<partition>``: to restart from when the node has no state for
    them), with ``report`` a request for the evaluated models (``REPORT_KEY``).
    """
    content = RecordDict(dict(records))
    needed: set[int] = set()
    for pid, task in tasks.items():
        content[partition_key(TASK_KEY, pid)] = task_record(task)
        needed.update(task.neighbours)
    for j in sorted(needed):
        content[f"{NEIGHBOUR_PREFIX}{j}"] = routing.latest[j]
    for pid in send_own:
        if pid in routing.latest:
            content[partition_key(OWN_KEY, pid)] = routing.latest[pid]
    if report:
        content[REPORT_KEY] = ConfigRecord()
    return content


def as_state_dict(model: ArrayRecord | StateDict) -> StateDict:
    """Tensors of a routed model (an ArrayRecord in Flower runs, a dict in-process)."""
    if isinstance(model, ArrayRecord):
        return dict(model.to_torch_state_dict())
    return model
