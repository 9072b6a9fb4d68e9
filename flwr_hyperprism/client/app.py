"""Flower ClientApp: a thin adapter from messages and ``context.state`` to the node rules."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from flwr_hyperprism.messages.protocol import (
    MODEL_KEY,
    NEIGHBOUR_PREFIX,
    OWN_KEY,
    REPORT_KEY,
    RUN_KEY,
    SESSION_KEY,
    TASK_KEY,
    metric_record,
    record_int,
    record_task,
)
from flwr_hyperprism.setup.config import RunConfig
from strategies import ALGORITHMS, NodeState, algorithm_spec
from strategies.base.checkpoint import node_checkpoints, starting_state
from strategies.base.learner import node_data, resolve_device
from strategies.base.node import LearningNode
from strategies.base.rule import StateDict

STATE_PREFIX = "node."  # context.state records "node.<group>" hold the node's tensors
ROUND_KEY = "node-round"
CONFIG_KEY = "node-run-config"  # context.state: the run config the orchestrator last sent

def info(msg: Message, context: Context) -> Message:
    """Tell the orchestrator which partition this node holds and whether it can load it.

    With the run config in the request, the node loads its data partition (cached for the
    rounds) and checks its ``device``; an error (missing dataset, impossible partition, a
    CUDA device it does not have) goes back as "error", so the run stops with the node's own
    message before round 1.
    """
    record = partition_info(context)
    if RUN_KEY in msg.content:
        config = RunConfig.from_run_config(msg.content.config_records[RUN_KEY])
        try:
            node_data(config, record_int(record, "partition-id"))
            resolve_device(config.device)  # e.g. cuda in a Ray actor given no GPU share
        except (OSError, ValueError) as err:
            record["error"] = f"{type(err).__name__}: {err}"
    return Message(RecordDict({"info": record}), reply_to=msg)


def partition_info(context: Context) -> ConfigRecord:
    """The node's partition-id and num-partitions from its node config."""
    return ConfigRecord({"partition-id": int(context.node_config["partition-id"]),
                         "num-partitions": int(context.node_config["num-partitions"])})


def _train(msg: Message, context: Context) -> Message:
    """One round of the algorithm named by the message type (``train.<algorithm>``).

    The node starts from the state in ``context.state``; a node without one (restarted, or
    in a resumed run) from its checkpoint in its state directory, else from its own model as
    last routed (``OWN_KEY``), else from the initial state (``starting_state``). With a state
    directory the new state is checkpointed before the reply goes out.
    """
    config = run_config(msg, context)
    partition_id = int(context.node_config["partition-id"])
    rule = _node_rule(config, partition_id)
    task = record_task(msg.content.config_records[TASK_KEY])
    neighbours = {int(key[len(NEIGHBOUR_PREFIX):]): record.to_torch_state_dict()
                  for key, record in msg.content.array_records.items()
                  if key.startswith(NEIGHBOUR_PREFIX)}
    checkpoints = node_checkpoints(context.node_config, config.state_dir, run_key(msg),
                                   partition_id)
    state = starting_state(task, load_state(context), checkpoints, routed_own(msg),
                           rule.init_state, rule.restore, partition_id)
    state, metrics, evaluated = rule.step(state, task, neighbours)
    save_state(context, state)
    if checkpoints is not None:
        checkpoints.save(state, task.stage)
    return train_reply(msg, state, metrics, evaluated if REPORT_KEY in msg.content else None)


def train_reply(msg: Message, state: NodeState, metrics: dict[str, float],
                model: StateDict | None) -> Message:
    """The reply to a train message: the node's shared tensors, its metrics and ``model``, its
    model of the round, when the orchestrator asked for it (``REPORT_KEY``)."""
    content = RecordDict({"arrays": ArrayRecord(state.shared), "metrics": metric_record(metrics)})
    if model is not None:
        content[MODEL_KEY] = ArrayRecord(model)
    return Message(content, reply_to=msg)


def run_config(msg: Message, context: Context) -> RunConfig:
    """The run config of a train message: the one it carries, which the node keeps in
    ``context.state``, else the one the node kept (the orchestrator sends it once per run, and
    again to a node that may have lost it or when it changes)."""
    if RUN_KEY in msg.content.config_records:
        context.state[CONFIG_KEY] = msg.content.config_records[RUN_KEY]
    elif CONFIG_KEY not in context.state:
        raise ValueError(f"partition {context.node_config.get('partition-id')} got a train "
                         f"message without the run config and has none kept (its node lost "
                         f"its state under the same node id): the orchestrator sends it with "
                         f"the next message, after this failed round-trip")
    return _parsed(tuple(context.state.config_records[CONFIG_KEY].items()))


@lru_cache(maxsize=16)
def _parsed(items: tuple[tuple[str, object], ...]) -> RunConfig:
    # one parse and validation per distinct config, not one per round-trip
    return RunConfig.from_run_config(dict(items))


def run_key(msg: Message) -> str:
    """The run key the orchestrator names the run's node checkpoints with ("" if none)."""
    session = msg.content.config_records.get(SESSION_KEY)
    return str(session["run-key"]) if session is not None else ""


def routed_own(msg: Message) -> StateDict | None:
    """The node's own model as the orchestrator last routed it, when the message has it."""
    record = msg.content.array_records.get(OWN_KEY)
    return dict(record.to_torch_state_dict()) if record is not None else None


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp: ``query.info`` and a ``train.<algorithm>`` handler per algorithm."""
    client_app = ClientApp(mods=list(mods))
    client_app.query("info")(info)
    for algorithm in ALGORITHMS:
        client_app.train(algorithm)(_train)
    return client_app


app = make_client_app()


@lru_cache(maxsize=256)
def _node_rule(config: RunConfig, partition_id: int) -> LearningNode:
    return algorithm_spec(config.algorithm).make_rule(config, partition_id)


def save_state(context: Context, state: NodeState) -> None:
    """Store a ``NodeState`` in ``context.state`` (one ArrayRecord per tensor group; groups
    the new state no longer has are removed)."""
    for key in [k for k in context.state.array_records if k.startswith(STATE_PREFIX)
                and k[len(STATE_PREFIX):] not in state.tensors]:
        del context.state[key]
    for group, tensors in state.tensors.items():
        context.state[STATE_PREFIX + group] = ArrayRecord(tensors)
    context.state[ROUND_KEY] = ConfigRecord({"round": state.round})


def load_state(context: Context) -> NodeState | None:
    """The ``NodeState`` saved by ``save_state``, or None on the node's first message."""
    if ROUND_KEY not in context.state:
        return None
    tensors = {key[len(STATE_PREFIX):]: dict(record.to_torch_state_dict())
               for key, record in context.state.array_records.items()
               if key.startswith(STATE_PREFIX)}
    return NodeState(record_int(context.state.config_records[ROUND_KEY], "round"), tensors)
