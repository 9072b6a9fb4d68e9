"""Flower ClientApp: a thin adapter from messages and ``context.state`` to the node rules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
    NEIGHBOUR_PREFIX,
    OWN_KEY,
    REPORT_KEY,
    RUN_KEY,
    SESSION_KEY,
    message_models,
    message_tasks,
    partition_key,
    record_int,
    reply_content,
)
from flwr_hyperprism.setup.config import RunConfig
from strategies import ALGORITHMS, NodeState, algorithm_spec
from strategies.base.checkpoint import node_checkpoints, starting_state
from strategies.base.group import NodeGroup
from strategies.base.learner import node_data, resolve_device
from strategies.base.node import LearningNode
from strategies.base.rule import StateDict

STATE_PREFIX = "node."  # context.state records "node.<partition>.<group>": a node's tensors
ROUND_KEY = "node-round"  # context.state records "node-round.<partition>"
CONFIG_KEY = "node-run-config"  # context.state: the run config the orchestrator last sent
PARTITIONS_KEY = "partition-ids"  # node config: the partitions a SuperNode hosts ("0-9,12")


def hosted_partitions(node_config: Mapping[str, bool | int | float | str], num_nodes: int
                      ) -> tuple[int, ...]:
    """The partitions a SuperNode hosts (its node group).

    Node config ``partition-ids`` lists them ("3", "0-9" or "0-4,7,9"); without it a SuperNode
    with ``partition-id`` k of ``num-partitions`` S hosts every partition p < ``num_nodes``
    with p % S == k: its own partition when the federation has a SuperNode per partition, a
    share of them when it has fewer (Flower's default simulation federation: 2), none when
    k >= ``num_nodes``. ValueError for a list that does not parse or names a partition
    outside 0..num_nodes-1.
    """
    if PARTITIONS_KEY not in node_config and not {"partition-id", "num-partitions"} <= set(
            node_config):
        raise ValueError(f"the node config has neither {PARTITIONS_KEY} nor partition-id and "
                         f"num-partitions ({dict(node_config)}): give the SuperNode "
                         f"--node-config \"{PARTITIONS_KEY}='0-9'\" (or partition-id and "
                         f"num-partitions)")
    if PARTITIONS_KEY in node_config:
        listed = _parse_partitions(str(node_config[PARTITIONS_KEY]))
        outside = [pid for pid in listed if not 0 <= pid < num_nodes]
        if outside:
            raise ValueError(f"node config {PARTITIONS_KEY}={node_config[PARTITIONS_KEY]!r} "
                             f"names partitions {outside} outside 0..{num_nodes - 1} "
                             f"(num-nodes={num_nodes})")
        return listed
    own, total = int(node_config["partition-id"]), int(node_config["num-partitions"])
    return tuple(range(own, num_nodes, total))


def _parse_partitions(text: str) -> tuple[int, ...]:
    partitions: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"node config {PARTITIONS_KEY}={text!r}: {part!r} is neither a "
                             f"partition id nor a range 'a-b'; write e.g. '0-9,12'")
        if dash and int(last) < int(first):
            raise ValueError(f"node config {PARTITIONS_KEY}={text!r}: the range {part!r} is "
                             f"empty; write it low to high, e.g. '{last}-{first}'")
        partitions.update(range(int(first), int(last if dash else first) + 1))
    if not partitions:
        raise ValueError(f"node config {PARTITIONS_KEY}={text!r} lists no partition; write "
                         f"e.g. '0-9,12'")
    return tuple(sorted(partitions))


def info(msg: Message, context: Context) -> Message:
    """Tell the orchestrator which partitions this node hosts and whether it can load them.

    With the run config in the request, the node lists its partitions (``partition-ids``,
    ``hosted_partitions``), loads their data (cached for the rounds) and checks its
    ``device``; an error (missing dataset, impossible partition, a CUDA device it does not
    have) goes back as "error", so the run stops with the node's own message before round 1.
    """
    record = partition_info(context)
    if RUN_KEY in msg.content:
        config = RunConfig.from_run_config(msg.content.config_records[RUN_KEY])
        try:
            hosted = hosted_partitions(context.node_config, config.num_nodes)
            record[PARTITIONS_KEY] = list(hosted)
            for pid in hosted:
                node_data(config, pid)
            resolve_device(config.device)  # e.g. cuda in a Ray actor given no GPU share
        except (OSError, ValueError) as err:
            record["error"] = f"{type(err).__name__}: {err}"
    return Message(RecordDict({"info": record}), reply_to=msg)


def partition_info(context: Context) -> ConfigRecord:
    """The node's partition-id and num-partitions from its node config (those it has)."""
    return ConfigRecord({key: int(context.node_config[key])
                         for key in ("partition-id", "num-partitions")
                         if key in context.node_config})


def _train(msg: Message, context: Context) -> Message:
    """One round-trip of the algorithm named by the message type (``train.<algorithm>``) for
    each partition the message has a task for, stepped together as the node's group.

    A partition starts from its state in ``context.state``; one without (a restarted node, a
    resumed run) from its checkpoint in its state directory, else from its own model as last
    routed (``OWN_KEY``), else from the initial state (``starting_state``). With a state
    directory the new states are checkpointed before the reply goes out.
    """
    config = run_config(msg, context)
    content = msg.content
    tasks = message_tasks(content)
    hosted = hosted_partitions(context.node_config, config.num_nodes)
    strangers = sorted(set(tasks) - set(hosted))
    if strangers:
        raise ValueError(f"the node hosts partitions {list(hosted)}, not {strangers}: check "
                         f"its node config ({PARTITIONS_KEY}, partition-id, num-partitions)")
    group = _node_group(config, hosted)
    owns = message_models(content, OWN_KEY)
    key = run_key(msg)
    checkpoints = {pid: node_checkpoints(context.node_config, config.state_dir, key, pid)
                   for pid in tasks}
    kept = load_states(context, tasks)
    starting = {pid: starting_state(task, kept[pid], checkpoints[pid], owns.get(pid),
                                    group.rules[pid].init_state, group.rules[pid].restore, pid)
                for pid, task in tasks.items()}
    outcomes = group.step(starting, tasks, message_models(content, NEIGHBOUR_PREFIX))
    save_states(context, {pid: outcome.state for pid, outcome in outcomes.items()})
    for pid, outcome in outcomes.items():
        saver = checkpoints[pid]
        if saver is not None:
            saver.save(outcome.state, tasks[pid].stage)
    reported = {pid: outcome.evaluated for pid, outcome in outcomes.items()
                if outcome.evaluated is not None} if REPORT_KEY in content else {}
    return Message(reply_content({pid: o.state.shared for pid, o in outcomes.items()},
                                 {pid: o.metrics for pid, o in outcomes.items()}, reported),
                   reply_to=msg)


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


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp: ``query.info`` and a ``train.<algorithm>`` handler per algorithm."""
    client_app = ClientApp(mods=list(mods))
    client_app.query("info")(info)
    for algorithm in ALGORITHMS:
        client_app.train(algorithm)(_train)
    return client_app


app = make_client_app()


@lru_cache(maxsize=256)
def _node_group(config: RunConfig, partitions: tuple[int, ...]) -> NodeGroup:
    # a process may serve many SuperNodes (simulation: a Ray actor), each its own group
    return NodeGroup({pid: _node_rule(config, pid) for pid in partitions},
                     config.node_batching, config.node_threads)


@lru_cache(maxsize=4096)
def _node_rule(config: RunConfig, partition_id: int) -> LearningNode:
    # built once per partition and process: its model, data and learner
    return algorithm_spec(config.algorithm).make_rule(config, partition_id)


def save_state(context: Context, partition: int, state: NodeState) -> None:
    """Store ``partition``'s ``NodeState`` in ``context.state`` (``save_states``)."""
    save_states(context, {partition: state})


def save_states(context: Context, states: Mapping[int, NodeState]) -> None:
    """Store each partition's ``NodeState`` in ``context.state`` (one ArrayRecord per tensor
    group; groups a new state no longer has are removed)."""
    # context.state.array_records builds a view of every record: once, not per partition
    stale = []
    for key in context.state.array_records:
        parsed = _state_key(key)
        if parsed is not None and parsed[0] in states and \
                parsed[1] not in states[parsed[0]].tensors:
            stale.append(key)
    for key in stale:
        del context.state[key]
    for partition, state in states.items():
        for group, tensors in state.tensors.items():
            context.state[f"{STATE_PREFIX}{partition}.{group}"] = ArrayRecord(tensors)
        context.state[partition_key(ROUND_KEY, partition)] = ConfigRecord({"round": state.round})


def load_state(context: Context, partition: int) -> NodeState | None:
    """``partition``'s ``NodeState`` saved by ``save_state``, or None before its first."""
    return load_states(context, [partition])[partition]


def load_states(context: Context, partitions: Iterable[int]) -> dict[int, NodeState | None]:
    """Each partition's ``NodeState`` saved by ``save_states`` (None before its first)."""
    wanted = set(partitions)
    rounds = context.state.config_records
    tensors: dict[int, dict[str, StateDict]] = {pid: {} for pid in wanted}
    for key, record in context.state.array_records.items():
        parsed = _state_key(key)
        if parsed is not None and parsed[0] in wanted:
            tensors[parsed[0]][parsed[1]] = dict(record.to_torch_state_dict())
    return {pid: NodeState(record_int(rounds[partition_key(ROUND_KEY, pid)], "round"),
                           tensors[pid])
            if partition_key(ROUND_KEY, pid) in rounds else None for pid in wanted}


def _state_key(key: str) -> tuple[int, str] | None:
    """(partition, group) of a ``context.state`` key "node.<partition>.<group>"."""
    if not key.startswith(STATE_PREFIX):
        return None
    partition, _, group = key[len(STATE_PREFIX):].partition(".")
    return (int(partition), group) if partition.isdigit() and group else None
