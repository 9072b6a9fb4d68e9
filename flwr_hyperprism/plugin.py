"""Plug-in mode: the decentralized algorithms inside an existing Flower app.

The user keeps their ClientApp's own ``@app.train()`` / ``@app.evaluate()`` handlers and adds
``flwr_hyperprism.mod.hyperprism_mod``; the ServerApp replaces ``FedAvg(...)`` by
``decentralized_strategy(...)``. Per round the orchestrator (still routing only) sends each node a
``train`` message with its task and its neighbours' latest models; the mod merges them with the
node's own model (``PluginNode``), hands the merged model to the user's handler as
``content["arrays"]``, keeps what the handler returns as the node's new model, and trains the
hypernetwork. Then an ``evaluate`` message per node lets the user's evaluate handler score the
merged model (the model after the round, as in the native app).

The hypernetwork needs the gradient of the local loss at the merged model; the user's loss is
unknown to the mod, so it uses the pseudo-gradient g = (merged - trained) / lr, with ``lr`` the
run config's learning rate (set it to the step size of the user's optimizer). For one plain SGD
step this is the minibatch gradient at the merged model; for several steps it is the mean
gradient along the local trajectory times their number (a rescaling that ``hn-lr`` absorbs), and
for momentum or adaptive optimizers it is their average update direction. The hypernetwork then
takes one SGD step on <g, merged(p)>, whose gradient in p is the chain rule with g in place of
the true gradient.

Mudag and ADOM+ need gradients at points they choose (Mudag: y; ADOM+: x_g), not a trained
model: the mod hands the point to the user's train handler and uses the same pseudo-gradient
(point - trained) / lr (``PluginGradientNode``); their step sizes stay 1 / ``smoothness``. With
one SGD step per handler call this is exactly the minibatch gradient; with several it is the
local-SGD direction above. Mudag's extra FastMix round-trips (stages 1..K-1) only mix and do not
call the handler; the evaluate message scores the model of the round (Mudag: x; ADOM+: x_f).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies import algorithm_spec
from strategies.adom import ADOMUpdate
from strategies.decentralized import DecentralizedStrategy, flat_metrics
from strategies.hyperprism import initial_weights, node_hypernetwork
from strategies.mudag import MudagUpdate
from strategies.node import (
    LINEAR,
    clone_tensors,
    load_optimizer_state,
    merge_models,
    optimizer_state,
)
from strategies.protocol import EVALUATE_KEY, STAGE_KEY
from strategies.rule import NodeState, NodeTask, StateDict

from .config import RunConfig
from .hypernetwork import gradient_summary
from .metrics import summarise_round
from .models import DECISION, REPRESENTATION

log = logging.getLogger("flwr")


class PluginStrategy(DecentralizedStrategy):
    """A ``DecentralizedStrategy`` that drives the user's handlers through the mod.

    Train and partition-id requests go as ``train`` messages (round 1 also carries the initial
    model as "arrays", the node's own model to start from); after each round an ``evaluate``
    message per node returns the user's evaluation of the merged model. The user's metrics
    named ``accuracy_metric`` and ``loss_metric`` become the rows' ``accuracy`` and ``loss``.
    """

    info_message_type = "train"
    train_message_type = "train"
    accuracy_metric: str = "accuracy"
    loss_metric: str = "loss"

    def summary(self) -> None:
        log.info("%s (plug-in mode: the app's own model, data and training): %s nodes, %s "
                 "graph (density %s), %s rounds", self.routing.description, self.config.num_nodes,
                 self.config.topology, self.config.density, self.config.num_rounds)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if server_round == 1 and int(config.get(STAGE_KEY, 0)) == 0:
            for message in messages:
                message.content["arrays"] = arrays
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """An evaluate message to each node that completed this round-trip's training."""
        marker = ConfigRecord({"round": server_round})
        return [Message(RecordDict({EVALUATE_KEY: marker, "config": config}),
                        dst_node_id=self.node_ids[pid], message_type="evaluate",
                        group_id=f"{server_round}.evaluate")
                for pid in sorted(self.node_metrics) if pid in self.node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Add each node's evaluation metrics to its metrics of this round."""
        for reply in replies:
            pid = self.addressed.get(reply.metadata.reply_to_message_id)
            if pid not in self.node_metrics or reply.has_error() or \
                    "metrics" not in reply.content:
                log.warning("round %s: no evaluation from partition %s: %s", server_round, pid,
                            reply.error.reason if reply.has_error() else "no metrics")
                continue
            metrics = scalar_metrics(reply.content["metrics"])
            for ours, theirs in (("accuracy", self.accuracy_metric), ("loss", self.loss_metric)):
                if theirs in metrics:
                    metrics[ours] = metrics[theirs]
            self.node_metrics[pid].update(metrics)
        return MetricRecord(flat_metrics(summarise_round(server_round - 1, self.node_metrics)))


def decentralized_strategy(algorithm: str = "hyperprism", *, p_mode: str = "hypernetwork",
                           accuracy_metric: str = "accuracy", loss_metric: str = "loss",
                           run_dir: str | None = None, **settings) -> DecentralizedStrategy:
    """The plug-in orchestrator for ``algorithm``, configured by ``RunConfig`` keywords.

    ``settings`` are RunConfig fields (e.g. ``num_nodes=10, lr=0.1, density=0.5``); ``lr`` must
    be the step size of the user's local optimizer (see the module docstring). HyperPrism's
    degrees in plug-in mode: ``p_mode`` 'hypernetwork' (the default here) or 'fixed'; the native
    default, 'tracking', is not available in plug-in mode yet. Metrics rows go to the log and,
    with ``run_dir``, to metrics.jsonl / summary.json there.
    """
    config = RunConfig(algorithm=algorithm, p_mode=p_mode, **settings)
    if config.p_mode not in ("hypernetwork", "fixed"):
        raise ValueError(f"p-mode={config.p_mode!r} is not available in plug-in mode yet: use "
                         f"p_mode='hypernetwork' or 'fixed'")
    if config.order != "atc":
        raise ValueError(f"order={config.order!r} is not available in plug-in mode (the user's "
                         f"handler trains the merged model): use order='atc'")
    strategy = PluginStrategy(algorithm_spec(algorithm).orchestrator(config), run_dir)
    strategy.accuracy_metric, strategy.loss_metric = accuracy_metric, loss_metric
    return strategy


def scalar_metrics(record: Mapping) -> dict[str, float]:
    """The int/float entries of a MetricRecord (lists are left out of the round summary)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def parameter_groups(names: list[str]) -> dict[str, list[str]]:
    """Layer groups of an unknown model: the last module's tensors are the decision layers.

    ``names`` are the floating-point tensors in state-dict order; the tensors that share the
    last one's module prefix (e.g. ``fc3.weight``, ``fc3.bias``) form the phi group.
    """
    last = names[-1].rpartition(".")[0]
    decision = [n for n in names if n.rpartition(".")[0] == last]
    return {REPRESENTATION: [n for n in names if n not in decision], DECISION: decision}


TrainHandler = Callable[[StateDict], StateDict]
"""The user's train handler as the mod calls it: a full model in, the trained model out."""
EVALUATED = "evaluated"  # the state group the evaluate message scores: the model after the round


class PluginNode:
    """A node's merge and hypernetwork in plug-in mode (pure torch; the mod does the I/O).

    State groups: ``shared`` (the node's latest trained model, what it sends), ``evaluated``
    (the merged model, what its evaluate handler scores), ``grad_summary`` and, for
    HyperPrism's hypernetwork, ``hypernet`` / ``hn_optimizer``.
    """

    def __init__(self, config: RunConfig, partition_id: int, names: tuple[str, ...]) -> None:
        """``names``: the model's floating-point tensors in state-dict order (merged ones)."""
        self.config = config
        self.groups = parameter_groups(list(names))
        self.hypernet, self.hn_optimizer = (
            node_hypernetwork(config, partition_id, len(names))
            if config.algorithm == "hyperprism" else (None, None))
        self.initial_hypernet = initial_weights(self.hypernet)

    def init_state(self, model: StateDict) -> NodeState:
        tensors = {"shared": clone_tensors(model), EVALUATED: clone_tensors(model),
                   "grad_summary": {"summary": gradient_summary(
                       torch.zeros_like(model[n]) for names in self.groups.values()
                       for n in names)}}
        if self.hypernet is not None:
            tensors.update(hypernet=clone_tensors(self.initial_hypernet), hn_optimizer={})
        return NodeState(0, tensors)

    def round_trip(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
                   train: TrainHandler, metrics: dict[str, float]) -> NodeState:
        """Merge, let the user's handler train the merged model, learn from what it returns."""
        merged = self.merge(state, task, neighbours, metrics)
        if not task.train:  # the round-trip after the last round: merge only
            detached = {k: v.detach() for k, v in merged.items()}
            return NodeState(task.round, {**state.tensors, "shared": detached,
                                          EVALUATED: detached})
        trained = train({k: v.detach() for k, v in merged.items()})
        return self.learn(state, merged, trained, task.round, metrics)

    def merge(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
              metrics: dict[str, float]) -> StateDict:
        """The merged model (differentiable in the degrees when the hypernetwork learns).

        Tensors that are not floating point (e.g. BatchNorm's counters) stay the node's own.
        """
        own = state.shared
        models = [own] + [neighbours[j] for j in task.neighbours]
        weights = torch.tensor((task.self_weight,) + task.weights)
        if self.hypernet is not None:
            self.hypernet.load_state_dict(state.tensors["hypernet"])
            load_optimizer_state(self.hn_optimizer, state.tensors["hn_optimizer"])
            degrees = self.hypernet(state.tensors["grad_summary"]["summary"])
        elif self.config.algorithm == "hyperprism":
            degrees = dict.fromkeys(self.groups, torch.tensor(self.config.fixed_p))
        else:
            degrees = LINEAR
        if self.config.algorithm == "hyperprism":
            metrics.update(p_theta=float(degrees[REPRESENTATION].detach()),
                           p_phi=float(degrees[DECISION].detach()))
        with torch.set_grad_enabled(self.hypernet is not None and len(models) > 1):
            merged = merge_models(models, weights, degrees, self.groups)
        return {**{k: v for k, v in own.items() if k not in merged}, **merged}

    def learn(self, state: NodeState, merged: StateDict, trained: StateDict, round_: int,
              metrics: dict[str, float]) -> NodeState:
        """The state after the user's handler turned ``merged`` into ``trained``.

        The pseudo-gradient (merged - trained) / lr feeds the hypernetwork's step and its next
        input summary.
        """
        names = [n for group in self.groups.values() for n in group]
        pseudo = {n: (merged[n].detach() - trained[n]) / self.config.lr for n in names}
        tensors = {**state.tensors, "shared": clone_tensors(trained),
                   EVALUATED: clone_tensors(merged),
                   "grad_summary": {"summary": gradient_summary(pseudo[n] for n in names)}}
        if self.hypernet is not None:
            surrogate = [(pseudo[n] * merged[n]).sum() for n in names if merged[n].requires_grad]
            if surrogate:
                self.hn_optimizer.zero_grad()
                torch.stack(surrogate).sum().backward()
                self.hn_optimizer.step()
                metrics["hn_steps"] = 1.0
            tensors.update(hypernet=clone_tensors(self.hypernet.state_dict()),
                           hn_optimizer=optimizer_state(self.hn_optimizer))
        return NodeState(round_, tensors)


class PluginGradientNode:
    """Mudag or ADOM+ in plug-in mode: the user's train handler is the gradient oracle.

    The gradient at the point x the method chooses is the pseudo-gradient (x - trained) / lr of
    the handler's training from x. Tensors that are not floating point stay as in the initial
    model. State: the method's groups plus ``evaluated`` (the full model to score).
    """

    def __init__(self, config: RunConfig, partition_id: int, names: tuple[str, ...]) -> None:
        self.config, self.names = config, names
        self.method = GRADIENT_METHODS[config.algorithm](config)

    def init_state(self, model: StateDict) -> NodeState:
        state = self.method.init_state({n: model[n] for n in self.names})
        state.tensors[EVALUATED] = clone_tensors(model)
        return state

    def round_trip(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
                   train: TrainHandler, metrics: dict[str, float]) -> NodeState:
        model = state.tensors[EVALUATED]

        def gradient(params: StateDict) -> StateDict:
            trained = train({**model, **params})
            return {n: (params[n] - trained[n]) / self.config.lr for n in params}

        new, evaluated = self.method.round_trip(state, task, neighbours, gradient)
        new.tensors[EVALUATED] = model if evaluated is None else {**model, **evaluated}
        return new


GRADIENT_METHODS = {"mudag": MudagUpdate, "adom": ADOMUpdate}


def plugin_node(config: RunConfig, partition_id: int, names: tuple[str, ...]
                ) -> PluginNode | PluginGradientNode:
    """The plug-in node rule of ``config.algorithm`` for a model with floating ``names``."""
    node_type = PluginGradientNode if config.algorithm in GRADIENT_METHODS else PluginNode
    return node_type(config, partition_id, names)
