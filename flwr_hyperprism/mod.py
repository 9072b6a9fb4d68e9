"""``hyperprism_mod``: the client side of plug-in mode (see ``flwr_hyperprism.plugin``).

Add it to an existing ClientApp, ``ClientApp(mods=[hyperprism_mod])``. It answers only messages
marked by a plug-in orchestrator and passes every other message (e.g. FedAvg's) untouched:

- partition-id requests: replies with ``node_config``'s partition-id and num-partitions;
- train messages with a task: merges the routed neighbour models with the node's own model
  (``context.state``), calls the user's train handler on the merged model, keeps the model it
  returns, trains the hypernetwork from the pseudo-gradient, and replies with the new model and
  the user's metrics plus its own (degrees, neighbours, dropped neighbours); for Mudag and
  ADOM+ the handler is the gradient oracle instead (``flwr_hyperprism.plugin.PluginGradientNode``);
- evaluate messages marked by the orchestrator: call the user's evaluate handler on the node's
  model of the round (the merged model for the gossip algorithms).
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from strategies.checkpoint import node_checkpoints, starting_state
from strategies.node import screen_and_log
from strategies.protocol import (
    EVALUATE_KEY,
    INFO_KEY,
    NEIGHBOUR_PREFIX,
    RUN_KEY,
    TASK_KEY,
    record_task,
)
from strategies.rule import StateDict

from .client_app import load_state, partition_info, routed_own, run_key, save_state
from .config import RunConfig
from .plugin import (
    EVALUATED,
    PluginGradientNode,
    PluginNode,
    plugin_node,
    scalar_metrics,
)


def hyperprism_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: decentralized merges around the user's own train/evaluate handlers."""
    if not msg.has_content():
        return call_next(msg, context)
    if INFO_KEY in msg.content:  # the user's app loads its own data: nothing to check here
        return Message(RecordDict({"info": partition_info(context)}), reply_to=msg)
    if TASK_KEY in msg.content:
        return _round_trip(msg, context, call_next)
    if EVALUATE_KEY in msg.content:
        state = load_state(context)
        msg.content = RecordDict({"arrays": ArrayRecord(state.tensors[EVALUATED]),
                                  "config": msg.content["config"]})
    return call_next(msg, context)


def _round_trip(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    content = msg.content
    config = RunConfig.from_run_config(content[RUN_KEY])
    task = record_task(content[TASK_KEY])
    partition_id = int(context.node_config["partition-id"])
    held, own = load_state(context), routed_own(msg)
    # round 1: the initial model the orchestrator sent; after a restart: the node's own model
    # as last routed (or its checkpoint, see starting_state)
    initial = (dict(content["arrays"].to_torch_state_dict()) if "arrays" in content.array_records
               else None)
    model = held.tensors[EVALUATED] if held is not None else own if own is not None else initial
    if model is None:
        raise ValueError(f"partition {partition_id} has no model to start round-trip "
                         f"{task.round}.{task.stage} from (no state, no routed model)")
    node = _node(config, partition_id, floating_names(model))
    checkpoints = node_checkpoints(context.node_config, config.state_dir, run_key(msg),
                                   partition_id)
    state = starting_state(task, held, checkpoints, own, lambda: node.init_state(model),
                           node.init_state, partition_id)
    neighbours = {int(key[len(NEIGHBOUR_PREFIX):]): record.to_torch_state_dict()
                  for key, record in content.array_records.items()
                  if key.startswith(NEIGHBOUR_PREFIX)}
    task, metrics = screen_and_log(state.shared, task, neighbours, config,
                                   int(context.node_config["partition-id"]))

    def train(model: StateDict) -> StateDict:
        msg.content = RecordDict({"arrays": ArrayRecord(model), "config": content["config"]})
        reply = call_next(msg, context)
        if reply.has_error():
            raise _HandlerFailed(reply)
        if "metrics" in reply.content:
            metrics.update(scalar_metrics(reply.content["metrics"]))
        return reply.content["arrays"].to_torch_state_dict()

    try:
        state = node.round_trip(state, task, neighbours, train, metrics)
    except _HandlerFailed as failure:
        return failure.reply
    save_state(context, state)
    if checkpoints is not None:
        checkpoints.save(state, task.stage)
    return Message(RecordDict({"arrays": ArrayRecord(state.shared),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


class _HandlerFailed(Exception):
    """The user's train handler replied with an error; the mod passes that reply on."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def floating_names(model: StateDict) -> tuple[str, ...]:
    return tuple(k for k, v in model.items() if v.is_floating_point())


@lru_cache(maxsize=64)
def _node(config: RunConfig, partition_id: int, names: tuple[str, ...]
          ) -> PluginNode | PluginGradientNode:
    # Built once per process and model layout; learned weights (hypernetwork) live in the state.
    return plugin_node(config, partition_id, names)
