"""A Ray-free Flower Grid for fast wiring tests: calls the ClientApp object directly.

Flower has no public API to give a message its id, its sender or the process's task identity:
its own grids and runtimes set them the way ``stamp`` and ``LocalGrid`` do (e.g.
``flwr.superlink.grid.inmemory_grid`` writes ``metadata.__dict__["_message_id"]``,
``flwr.server.compat.app`` sets ``TaskIdentity``). These two places are the only ones in the
tests that do.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from flwr_hyperprism.messages.protocol import message_tasks


def train_round(msg: Message) -> int | None:
    """The round of a train message's tasks (None: not a train message)."""
    tasks = message_tasks(msg.content) if msg.has_content() else {}
    return next(iter(tasks.values())).round if tasks else None


def stamp(msg: Message, *, message_id: str | None = None, src_node_id: int | None = None
          ) -> None:
    """Set what a grid sets on a message it delivers (no public API: see the module doc)."""
    if message_id is not None:
        msg.metadata.__dict__["_message_id"] = message_id
    if src_node_id is not None:
        msg.metadata.__dict__["_src_node_id"] = src_node_id


class LocalGrid(Grid):
    """Virtual nodes with their own ``Context``; ``partitions`` maps node id -> (pid, total).

    A ClientApp exception becomes an error reply (code 2), as in a real run.
    """

    def __init__(self, client_app: ClientApp, partitions: dict[int, tuple[int, int]],
                 run_config: dict | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.client_app = client_app
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config=run_config or {},
                         node_config={"partition-id": pid, "num-partitions": total})
            for nid, (pid, total) in partitions.items()
        }
        self.replies: dict[str, Message] = {}

    @classmethod
    def with_nodes(cls, client_app: ClientApp, num_nodes: int, run_config: dict | None = None
                   ) -> LocalGrid:
        # Node ids deliberately unrelated to partition ids.
        return cls(client_app, {1000 + 7 * pid: (pid, num_nodes) for pid in range(num_nodes)},
                   run_config)

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError("deprecated in Flower 1.41: construct Message directly")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            stamp(msg, message_id=uuid4().hex, src_node_id=0)
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(msg, context)
            except Exception as err:  # noqa: BLE001 - mirrors Flower's error replies
                reply = Message(Error(2, repr(err)), reply_to=msg)
            stamp(reply, src_node_id=msg.metadata.dst_node_id)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


SUPERLINK_NODE_ID = 1  # the id Flower's SuperLink signs the error replies it writes with


class ElasticGrid(LocalGrid):
    """A ``LocalGrid`` whose nodes leave and join while the run goes on.

    ``events`` maps a round-trip (round, stage) to changes made just before its train messages
    are handled: ``("leave", node_id)`` disconnects a node (its context is lost; like a killed
    SuperNode, it no longer shows in ``get_node_ids``) and ``("join", node_id, partition_id)``
    connects a new one with a fresh context. A message to a node that is gone is answered as
    Flower's SuperLink answers it: an error reply signed with the SuperLink's own id.
    """

    def __init__(self, client_app: ClientApp, partitions: dict[int, tuple[int, int]],
                 events: dict[tuple[int, int], list[tuple]], run_config: dict | None = None
                 ) -> None:
        super().__init__(client_app, partitions, run_config)
        self.events, self.run_config = events, run_config or {}
        self.num_partitions = next(iter(partitions.values()))[1]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        tasks = [task for m in messages if m.has_content()
                 for task in message_tasks(m.content).values()]
        if tasks:
            for event in self.events.pop((tasks[0].round, tasks[0].stage), []):
                if event[0] == "leave":
                    del self.contexts[event[1]]
                else:
                    _, node_id, partition_id = event
                    self.contexts[node_id] = Context(
                        run_id=1, node_id=node_id, state=RecordDict(),
                        run_config=self.run_config,
                        node_config={"partition-id": partition_id,
                                     "num-partitions": self.num_partitions})
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id in self.contexts:
                ids.extend(super().push_messages([msg]))
                continue
            stamp(msg, message_id=uuid4().hex)
            reply = Message(Error(3, "Node Unavailable: the destination node failed to report "
                                     "a heartbeat"), reply_to=msg)
            stamp(reply, src_node_id=SUPERLINK_NODE_ID)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids
