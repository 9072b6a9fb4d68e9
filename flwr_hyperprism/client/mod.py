"""``hyperprism_mod``: the client side of plug-in mode (see ``flwr_hyperprism.server.plugin``).

Add it to an existing ClientApp, ``ClientApp(mods=[hyperprism_mod])``. It answers only messages
marked by a plug-in orchestrator and passes every other message (e.g. FedAvg's) untouched:

- partition-id requests: replies with ``node_config``'s partition-id and num-partitions;
- train messages with a task: runs the algorithm's node rule on the node's state
  (``context.state``) and the routed neighbour models, with the user's train handler as its
  learner (``flwr_hyperprism.client.handler.HandlerLearner``), and replies with the new
  shared tensors and the user's metrics plus the rule's own (degrees, neighbours, dropped
  neighbours);
- evaluate messages marked by the orchestrator: call the user's evaluate handler on the model
  the node holds after the round (for the gossip algorithms its trained model: the personal
  layers the user's handlers keep in their own state then belong to it; merged only, in the
  last round, which does not train).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from flwr_hyperprism.messages.protocol import (
    EVALUATE_KEY,
    INFO_KEY,
    NEIGHBOUR_PREFIX,
    OWN_KEY,
    REPORT_KEY,
    message_models,
    message_tasks,
    reply_content,
    scalar_metrics,
)
from strategies import NodeState, algorithm_spec
from strategies.base.checkpoint import node_checkpoints, starting_state
from strategies.base.node import GossipNode, LearningNode
from strategies.base.rule import StateDict

from .app import load_state, partition_info, run_config, run_key, save_state
from .handler import EVALUATED, HandlerLearner


def hyperprism_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: decentralized merges around the user's own train/evaluate handlers."""
    if not msg.has_content():
        return call_next(msg, context)
    if INFO_KEY in msg.content:  # the user's app loads its own data: nothing to check here
        return Message(RecordDict({"info": partition_info(context)}), reply_to=msg)
    if message_tasks(msg.content):
        return _round_trip(msg, context, call_next)
    if EVALUATE_KEY in msg.content:
        state = load_state(context, int(context.node_config["partition-id"]))
        if state is None:
            raise ValueError(f"partition {context.node_config['partition-id']} was asked to "
                             f"evaluate before its first train round-trip")
        msg.content = RecordDict({"arrays": ArrayRecord(state.tensors[EVALUATED]),
                                  "config": msg.content.config_records["config"]})
    return call_next(msg, context)


def _round_trip(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    content = msg.content
    config = run_config(msg, context)
    partition_id = int(context.node_config["partition-id"])
    tasks = message_tasks(content)
    if set(tasks) != {partition_id}:
        raise ValueError(f"a plug-in node hosts its node config's partition-id={partition_id}; "
                         f"the message has tasks for partitions {sorted(tasks)}")
    task = tasks[partition_id]
    spec = algorithm_spec(config.algorithm)
    # a gossip rule's shared tensors are its model (plus riders); other rules share vectors
    gossip = spec.node_rule if issubclass(spec.node_rule, GossipNode) else None

    def train(model: StateDict) -> tuple[StateDict, dict[str, float]]:
        msg.content = RecordDict({"arrays": ArrayRecord(model),
                                  "config": content.config_records["config"]})
        reply = call_next(msg, context)
        if reply.has_error():
            raise _HandlerFailed(reply)
        records = reply.content
        metrics = (scalar_metrics(records.metric_records["metrics"])
                   if "metrics" in records.metric_records else {})
        return dict(records.array_records["arrays"].to_torch_state_dict()), metrics

    def node(model: StateDict) -> LearningNode:
        return spec.make_rule(config, partition_id, HandlerLearner(model, train, config))

    def init() -> NodeState:  # round 1: the initial model the orchestrator sent
        if "arrays" not in content.array_records:
            raise ValueError(f"partition {partition_id} has no model to start round-trip "
                             f"{task.round}.{task.stage} from (no state, no routed model)")
        return _evaluating(node, dict(content.array_records["arrays"].to_torch_state_dict()), None)

    def restore(shared: StateDict) -> NodeState:  # a node without state: its routed model
        if gossip is None:
            raise ValueError(f"partition {partition_id} lost its state and {spec.display_name} "
                             f"routes no model it could restart from: give the nodes a "
                             f"state-dir (node config) so that they checkpoint")
        return _evaluating(node, gossip.model_of(shared), shared)

    checkpoints = node_checkpoints(context.node_config, config.state_dir, run_key(msg),
                                   partition_id)
    state = starting_state(task, load_state(context, partition_id), checkpoints,
                           message_models(content, OWN_KEY).get(partition_id), init, restore,
                           partition_id)
    model = state.tensors[EVALUATED]
    previous = gossip.model_of(state.shared) if gossip is not None else None
    learner = HandlerLearner(model, train, config, previous, partition_id)
    rule = spec.make_rule(config, partition_id, learner)
    try:
        state, metrics, evaluated = rule.step(state, task,
                                              message_models(content, NEIGHBOUR_PREFIX))
    except _HandlerFailed as failure:
        return failure.reply
    # what the node holds now: a gossip node's new model (trained, with its newest personal
    # layers, which the user's handlers may keep in their own state), else the rule's point
    held = gossip.model_of(state.shared) if gossip is not None else evaluated
    state.tensors[EVALUATED] = held if held is not None else model
    save_state(context, partition_id, state)
    if checkpoints is not None:
        checkpoints.save(state, task.stage)
    return Message(reply_content({partition_id: state.shared}, {partition_id: metrics},
                                 {partition_id: state.tensors[EVALUATED]}
                                 if REPORT_KEY in content else {}), reply_to=msg)


def _evaluating(node: Callable[[StateDict], LearningNode], model: StateDict,
                shared: StateDict | None) -> NodeState:
    """The rule's initial state for ``model`` (restored to ``shared`` if given), with the
    model the evaluate message scores."""
    rule = node(model)
    state = rule.init_state() if shared is None else rule.restore(shared)
    state.tensors[EVALUATED] = model
    return state


class _HandlerFailed(Exception):
    """The user's train handler replied with an error; the mod passes that reply on."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply
