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

    def neighbour_models(self, task: NodeTask) -> dict[int, Routed]:
        """The latest tensors of the task's neighbours."""
        return {j: self.latest[j] for j in task.neighbours}

    def trained_in(self, round_: int) -> list[int]:
        """Partitions whose latest tensors come from round ``round_``."""
        return sorted(pid for pid, received in self.received.items() if received == round_)


def train_contents(tasks: Mapping[int, NodeTask], routing: RoutingTable[ArrayRecord],
                   records: Mapping[str, ConfigRecord], run_config: ConfigRecord,
                   in_sync: Collection[int], hold_config: Collection[int], report: bool
                   ) -> dict[int, RecordDict]:
    """The content of each task's train message (``train_content``): the partitions not
    ``in_sync`` get their own latest model, those not in ``hold_config`` the ``run_config``
    (as ``RUN_KEY``)."""
    return {pid: train_content(pid, task, routing, records if pid in hold_config
                               else {**records, RUN_KEY: run_config}, pid not in in_sync, report)
            for pid, task in tasks.items()}


def train_content(partition: int, task: NodeTask, routing: RoutingTable[ArrayRecord],
                  records: Mapping[str, ConfigRecord], send_own: bool, report: bool
                  ) -> RecordDict:
    """The content of ``partition``'s train message.

    Its task, ``records`` (the run config, the session that names the nodes' checkpoints,
    the train config passed on), every neighbour's latest model as ``nbr.<partition>``; with
    ``send_own`` the partition's own latest model (``OWN_KEY``: to restart from when its node
    has no state of its own), with ``report`` a request for the node's evaluated model
    (``REPORT_KEY``).
    """
    content = RecordDict({TASK_KEY: task_record(task), **records})
    for j, model in routing.neighbour_models(task).items():
        content[f"{NEIGHBOUR_PREFIX}{j}"] = model
    if send_own and partition in routing.latest:
        content[OWN_KEY] = routing.latest[partition]
    if report:
        content[REPORT_KEY] = ConfigRecord()
    return content


def as_state_dict(model: ArrayRecord | StateDict) -> StateDict:
    """Tensors of a routed model (an ArrayRecord in Flower runs, a dict in-process)."""
    if isinstance(model, ArrayRecord):
        return dict(model.to_torch_state_dict())
    return model
