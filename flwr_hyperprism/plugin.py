"""Plug-in mode: the decentralized algorithms inside an existing Flower app.

The user keeps their ClientApp's own ``@app.train()`` / ``@app.evaluate()`` handlers and adds
``flwr_hyperprism.mod.hyperprism_mod``; the ServerApp replaces ``FedAvg(...)`` by
``decentralized_strategy(...)``. Per round the orchestrator (still routing only) sends each node a
``train`` message with its task and its neighbours' latest models; the mod runs the algorithm's
own node rule (the one the native apps run) with a ``HandlerLearner``: the rule merges, hands
the merged model to the user's handler as ``content["arrays"]``, keeps what the handler returns
as the node's new model and updates its degrees. Then an ``evaluate`` message per node lets the
user's evaluate handler score the model the node holds (its trained model; merged only in the
last round, which does not train), the model a server-side ``evaluate_fn`` scores too.

What the rules need besides a trained model is a gradient of the local loss. The user's loss is
unknown to the mod, so it uses the pseudo-gradient g = (start - trained) / lr, with ``lr`` the
run config's learning rate (set it to the step size of the user's optimizer). For one plain SGD
step this is the minibatch gradient at the start; for several steps it is the mean gradient
along the local trajectory times their number, and for momentum or adaptive optimizers their
average update direction. HyperPrism's learned degree (p-mode tracking) tracks g; its
hypernetwork (p-mode hypernetwork) takes its step along <g, merged(p)> after training instead of
on a fresh minibatch; Mudag and ADOM+ hand the point they need a gradient at (Mudag: y; ADOM+:
x_g) to the handler, their step sizes stay 1 / ``smoothness``, Mudag's extra FastMix round-trips
(stages 1..K-1) only mix and do not call the handler, and the evaluate message scores the model
of the round (Mudag: x; ADOM+: x_f).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from strategies import algorithm_spec
from strategies.decentralized import DecentralizedStrategy, RoundCallback, federation_size
from strategies.learner import LocalUpdate
from strategies.protocol import EVALUATE_KEY, STAGE_KEY, record_int, scalar_metrics
from strategies.rule import NodeState, StateDict

from .config import RunConfig
from .models import DECISION, REPRESENTATION

log = logging.getLogger("flwr")

NATIVE_ONLY = ("dataset", "data_dir", "download", "model", "alpha", "min_partition_size",
               "batch_size", "local_epochs", "local_steps", "momentum", "eval_size",
               "validation_fraction",
               "swarm_local_steps")
"""RunConfig fields only the native apps read: in plug-in mode the user's app owns its data,
model and training, so passing one is an error and config.json leaves them out."""

FEDAVG_ONLY = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
               "min_available_nodes")
"""FedAvg's client-sampling arguments: a decentralized round has no sampling to configure."""

TrainConfigFn = Callable[[int], ConfigRecord]
"""``train_config_fn(round)``: the train config of a round (e.g. a learning-rate schedule)."""


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
    num_nodes_from_federation = False  # num_nodes was not given: the nodes' num-partitions
    lr_key: str | None = None  # lr was not given: each round's train config[lr_key]
    train_config_fn: TrainConfigFn | None = None

    def prepare(self, grid: Grid, train_config: ConfigRecord | None) -> None:
        """num-nodes from the federation when it was not given."""
        if self.num_nodes_from_federation:
            total = federation_size(grid, self.config.node_wait_timeout, self.info_message_type)
            log.info("num-nodes=%s: the federation's num-partitions", total)
            self.routing = type(self.routing)(self.config.replace(num_nodes=total))

    def round_config(self, passed_on: ConfigRecord) -> RunConfig:
        """With ``lr`` from the train config: the run config with this round's lr."""
        if self.lr_key is None:
            return self.config
        if self.lr_key not in passed_on:
            raise ValueError(f"the learning rate is unknown: pass lr=<your optimizer's step "
                             f"size> to decentralized_strategy, or put {self.lr_key!r} in "
                             f"train_config (or train_config_fn's records)")
        return self.config.replace(lr=float(passed_on[self.lr_key]))  # type: ignore[arg-type]

    def described_settings(self) -> dict[str, object]:
        """The settings a plug-in run uses; the user's app decides data, model, training."""
        settings: dict[str, object] = {k: v for k, v in self.config.to_run_config().items()
                                       if k.replace("-", "_") not in NATIVE_ONLY}
        settings.update({"mode": "plug-in", "accuracy-metric": self.accuracy_metric,
                         "loss-metric": self.loss_metric})
        if self.lr_key is not None:
            settings["lr"] = f"train config {self.lr_key!r}, per round"
        return settings

    def summary(self) -> None:
        log.info("%s (plug-in mode: the app's own model, data and training): %s nodes, %s "
                 "graph (density %s), %s rounds", self.routing.description, self.config.num_nodes,
                 self.config.topology, self.config.density, self.config.num_rounds)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.train_config_fn is not None:
            config = ConfigRecord({**config, **self.train_config_fn(server_round)})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if server_round == 1 and (STAGE_KEY not in config or record_int(config, STAGE_KEY) == 0):
            for message in messages:
                message.content["arrays"] = arrays
        return messages

    def check_evaluate_config(self, evaluate_config: ConfigRecord | None) -> None:
        """Used: it is the "config" of the evaluate messages to the user's handler."""

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """An evaluate message to each node that replied to this round's training."""
        marker = ConfigRecord({"round": server_round})
        trained = sorted(pid for pid, round_ in self.received.items() if round_ == server_round)
        return [Message(RecordDict({EVALUATE_KEY: marker, "config": config}),
                        dst_node_id=self.node_ids[pid], message_type="evaluate",
                        group_id=f"{server_round}.evaluate")
                for pid in trained if pid in self.node_ids]

    def collect_evaluation(self, server_round: int, replies: Iterable[Message]
                           ) -> dict[int, dict[str, float]]:
        """Each node's evaluation metrics, the user's accuracy and loss metrics also as
        ``accuracy`` and ``loss``."""
        evaluated = {}
        for reply in replies:
            pid = self.addressed.get(reply.metadata.reply_to_message_id)
            if pid is None or reply.has_error() or "metrics" not in reply.content.metric_records:
                log.warning("round %s: no evaluation from partition %s: %s", server_round, pid,
                            reply.error.reason if reply.has_error() else "no metrics")
                continue
            metrics = scalar_metrics(reply.content.metric_records["metrics"])
            for ours, theirs in (("accuracy", self.accuracy_metric), ("loss", self.loss_metric)):
                if theirs in metrics:
                    metrics[ours] = metrics[theirs]
            evaluated[pid] = metrics
        return evaluated


def decentralized_strategy(algorithm: str = "hyperprism", *, accuracy_metric: str = "accuracy",
                           loss_metric: str = "loss", run_dir: str | Path | None = None,
                           on_round: RoundCallback | None = None,
                           train_config_fn: TrainConfigFn | None = None, lr_key: str = "lr",
                           **settings: Any) -> DecentralizedStrategy:
    """The plug-in orchestrator for ``algorithm``, configured by ``RunConfig`` keywords.

    ``settings`` are RunConfig fields (e.g. ``density=0.5``, HyperPrism's ``p_mode``,
    ``server_eval_every``); those of the native apps' data, model and training
    (``NATIVE_ONLY``) are an error. ``num_nodes`` defaults to the federation's num-partitions;
    ``lr``, which must be the step size of the user's local optimizer (see the module
    docstring), to each round's train config ``lr_key``. ``train_config_fn(round)`` adds to
    ``start``'s train_config per round (e.g. a learning-rate schedule).
    ``on_round(row, models)`` runs after every metrics row (what a FedAvg subclass does per
    round: checkpoint the best model, log to W&B, write results): ``models`` are the nodes'
    models of the round in the rounds the nodes send them (``server_eval_every``, with an
    evaluate_fn or on_round, and the last), else empty. Rows go to the log and to
    metrics.jsonl / summary.json / config.json in ``run_dir`` (relative: under
    ``default_run_root()``; default: a new ``<algorithm>-plugin-<UTC time>`` there).
    """
    sampling = sorted(set(settings) & set(FEDAVG_ONLY))
    if sampling:
        raise ValueError(f"{', '.join(sampling)}: FedAvg's client sampling, which a "
                         f"decentralized round does not have: every node trains and merges "
                         f"with its neighbours each round (the graph's density and a node's "
                         f"max-staleness decide who talks to whom); remove them")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ValueError(f"unknown settings {unknown}; decentralized_strategy takes the "
                         f"RunConfig fields (flwr_hyperprism/config.py), e.g. density, seed, "
                         f"p_mode")
    native = sorted(set(settings) & set(NATIVE_ONLY))
    if native:
        raise ValueError(f"{', '.join(native)}: settings of the native apps' data, model and "
                         f"training; in plug-in mode your ClientApp owns these, remove them")
    config = RunConfig(algorithm=algorithm, **settings)
    if config.order != "atc":
        raise ValueError(f"order={config.order!r} is not available in plug-in mode (the user's "
                         f"handler trains the merged model): use order='atc'")
    spec = algorithm_spec(algorithm)
    spec.check(config)
    root = default_run_root()
    run_dir = root / (run_dir if run_dir is not None else
                      f"{algorithm}-plugin-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    strategy = PluginStrategy(spec.orchestrator(config), run_dir, on_round)
    strategy.accuracy_metric, strategy.loss_metric = accuracy_metric, loss_metric
    strategy.num_nodes_from_federation = "num_nodes" not in settings
    strategy.lr_key = None if "lr" in settings else lr_key
    strategy.train_config_fn = train_config_fn
    return strategy


def default_run_root() -> Path:
    """Where plug-in runs write their outputs: ``$FLWR_HOME/hyperprism-runs`` (FLWR_HOME
    defaults to ~/.flwr), an absolute directory outside any FAB."""
    return Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser().resolve() / "hyperprism-runs"


def parameter_groups(names: list[str]) -> dict[str, list[str]]:
    """Layer groups of an unknown model: the last module's tensors are the decision layers.

    ``names`` are the floating-point tensors in state-dict order; the tensors that share the
    last one's module prefix (e.g. ``fc3.weight``, ``fc3.bias``) form the phi group.
    """
    last = names[-1].rpartition(".")[0]
    decision = [n for n in names if n.rpartition(".")[0] == last]
    return {REPRESENTATION: [n for n in names if n not in decision], DECISION: decision}


TrainHandler = Callable[[StateDict], tuple[StateDict, dict[str, float]]]
"""The user's train handler as the mod calls it: a full model in, the trained model and the
handler's scalar metrics out."""


EVALUATED = "evaluated"  # the state group the evaluate message scores: the model after the round


class HandlerLearner:
    """Plug-in mode's ``Learner``: the user's train handler trains, the user's evaluate handler
    scores.

    ``train`` hands the model to the handler and takes the pseudo-gradient (start - trained) /
    ``lr`` as the local gradient; ``gradient`` (Mudag, ADOM+) trains from the point and returns
    that pseudo-gradient; there is no fresh-minibatch ``probe``, so HyperPrism's hypernetwork
    steps on the pseudo-gradient. ``evaluate`` only records the model (``evaluated``): the
    evaluate message after the round scores it with the user's handler.

    Parameters
    ----------
    model : the node's current full model (integer buffers too); its floating-point tensors
        outside ``local-layers`` are what the algorithms merge, its last module is the
        decision group (``parameter_groups``)
    handler : the user's train handler
    config : the run config (``lr``: the step size of the user's optimizer, the
        pseudo-gradient's scale; ``local-layers``: the personal layers)
    previous : the node's own model before this round's merge (gossip algorithms): a merged
        tensor that the handler returns closer to it than to the merged value was put back by
        the handler (a personal layer not declared in ``local-layers``), which is logged
    partition_id : for the log
    """

    num_examples = None
    device = torch.device("cpu")  # the user's handler chooses its own device

    def __init__(self, model: StateDict, handler: TrainHandler, config: RunConfig,
                 previous: StateDict | None = None, partition_id: int = 0) -> None:
        self.initial_model, self.handler, self.lr = model, handler, config.lr
        self.names = tuple(k for k, v in model.items()
                           if v.is_floating_point() and not config.is_local(k))
        self.groups = parameter_groups(list(self.names))
        self.previous, self.partition_id = previous, partition_id
        self.evaluated: StateDict | None = None

    def load(self, state: NodeState) -> None:
        """Nothing to load: the handler keeps its own optimizer."""

    def save(self) -> dict[str, StateDict]:
        return {}

    def evaluate(self, model: StateDict) -> dict[str, float]:
        self.evaluated = model
        return {}

    def train(self, model: StateDict, gen: torch.Generator) -> LocalUpdate:
        trained, metrics = self.handler(model)
        if trained.keys() != model.keys():
            raise ValueError(f"the train handler returned arrays {sorted(trained)}; the model "
                             f"it was given has {sorted(model)}: return the whole model")
        self.check_restored(model, trained)
        pseudo = {n: (model[n] - trained[n]) / self.lr for n in self.names}
        return LocalUpdate(dict(trained), metrics, pseudo)

    def check_restored(self, given: StateDict, trained: StateDict) -> None:
        """Warn about merged tensors the handler replaced by the node's own previous ones."""
        if self.previous is None:
            return
        restored = [n for n in self.names if not torch.equal(given[n], self.previous[n])
                    and float(torch.dist(trained[n], self.previous[n]))
                    < 0.5 * float(torch.dist(trained[n], given[n]))]
        if restored:
            log.warning("partition %s: the train handler returned %s closer to the node's own "
                        "previous values than to the merged model it was given: it seems to "
                        "put personal layers back; declare them local_layers=%r so that they "
                        "stay out of the merge and the pseudo-gradient", self.partition_id,
                        restored, ",".join(sorted({n.rpartition(".")[0] + ".*"
                                                   for n in restored})))

    def gradient(self, params: StateDict, gen: torch.Generator
                 ) -> tuple[dict[str, float], StateDict]:
        update = self.train({**self.initial_model, **params}, gen)
        return update.metrics, {n: update.gradient[n] for n in params}

    def probe(self, model: StateDict, gen: torch.Generator) -> None:
        return None
