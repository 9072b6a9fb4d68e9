"""Plug-in mode: the decentralized algorithms inside an existing Flower app.

The user keeps their ClientApp's own ``@app.train()`` / ``@app.evaluate()`` handlers and adds
``flwr_hyperprism.client.mod.hyperprism_mod``; the ServerApp replaces ``FedAvg(...)`` by
``decentralized_strategy(...)``. Per round the orchestrator (still routing only) sends each node a
``train`` message with its task and its neighbours' latest models; the mod runs the algorithm's
own node rule (the one the native apps run) with a ``HandlerLearner``: the rule merges, hands
the merged model to the user's handler as ``content["arrays"]``, keeps what the handler returns
as the node's new model and updates its degrees. Then an ``evaluate`` message per node lets the
user's evaluate handler score the model the node holds (its trained model; merged only in the
last round, which does not train), the model a server-side ``evaluate_fn`` scores too.
The node side (the mod and its ``HandlerLearner``) is ``flwr_hyperprism.client``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from flwr_hyperprism.messages.protocol import EVALUATE_KEY, STAGE_KEY, record_int, scalar_metrics
from flwr_hyperprism.orchestration.membership import federation_size
from flwr_hyperprism.orchestration.rounds import NodeMetrics, RoundCallback, RoundLoop
from flwr_hyperprism.orchestration.transport import Exchange
from flwr_hyperprism.server.strategy import DecentralizedStrategy
from flwr_hyperprism.setup.config import RunConfig
from strategies import algorithm_spec

log = logging.getLogger("flwr")

NATIVE_ONLY = ("dataset", "data_dir", "download", "model", "alpha", "min_partition_size",
               "batch_size", "local_epochs", "local_steps", "momentum", "eval_size",
               "validation_fraction")
"""RunConfig fields only the native apps read: in plug-in mode the user's app owns its data,
model and training, so passing one is an error and config.json leaves them out (as it leaves
out an algorithm's ``AlgorithmSettings.native_only``)."""

FEDAVG_ONLY = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
               "min_available_nodes")
"""FedAvg's client-sampling arguments: a decentralized round has no sampling to configure."""

TrainConfigFn = Callable[[int], ConfigRecord]
"""``train_config_fn(round)``: the train config of a round (e.g. a learning-rate schedule)."""


class PluginStrategy(DecentralizedStrategy):
    """A ``DecentralizedStrategy`` that drives the user's handlers through the mod.

    Train and partition-id requests go as ``train`` messages (round 1 also carries the initial
    model as "arrays", the node's own model to start from); after each round an ``evaluate``
    message per node returns the user's evaluation of the model it holds.

    Parameters
    ----------
    loop : the algorithm's round loop
    accuracy_metric, loss_metric : the user's metrics that become the rows' ``accuracy`` and
        ``loss``
    num_nodes_from_federation : num-nodes was not given: take the nodes' num-partitions
    lr_key : lr was not given: each round's train config[lr_key] (None: the run config's lr)
    train_config_fn : ``train_config_fn(round)`` adds to each round's train config
    """

    def __init__(self, loop: RoundLoop, *, accuracy_metric: str = "accuracy",
                 loss_metric: str = "loss", num_nodes_from_federation: bool = False,
                 lr_key: str | None = None, train_config_fn: TrainConfigFn | None = None
                 ) -> None:
        super().__init__(loop, query_type="train", train_message_type="train")
        self.accuracy_metric, self.loss_metric = accuracy_metric, loss_metric
        self.num_nodes_from_federation = num_nodes_from_federation
        self.lr_key, self.train_config_fn = lr_key, train_config_fn

    def prepare(self, grid: Grid, train_config: ConfigRecord | None) -> None:
        """num-nodes from the federation when it was not given."""
        if self.num_nodes_from_federation:
            total = federation_size(grid, self.config.node_wait_timeout, self.members.query_type)
            log.info("num-nodes=%s: the federation's num-partitions", total)
            self.loop.reconfigure(num_nodes=total)

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
        native = {*NATIVE_ONLY, *self.config.algorithm_settings.native_only}
        settings: dict[str, object] = {k: v for k, v in self.config.to_run_config().items()
                                       if k.replace("-", "_") not in native}
        settings.update({"mode": "plug-in", "accuracy-metric": self.accuracy_metric,
                         "loss-metric": self.loss_metric})
        if self.lr_key is not None:
            settings["lr"] = f"train config {self.lr_key!r}, per round"
        return settings

    def summary(self) -> None:
        log.info("%s (plug-in mode: the app's own model, data and training): %s nodes, %s "
                 "graph (density %s), %s rounds", self.loop.plan.description,
                 self.config.num_nodes, self.config.topology, self.config.density,
                 self.config.num_rounds)

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

    def evaluate_round(self, grid: Grid, round_: int, arrays: ArrayRecord,
                       evaluate_config: ConfigRecord, node_metrics: NodeMetrics) -> None:
        """The user's evaluate handler on each node that trained this round; its metrics join
        the node's."""
        asked = list(self.configure_evaluate(round_, arrays, evaluate_config, grid))
        if asked:
            replies = self.exchange(grid, asked, f"round {round_} evaluation")
            for pid, metrics in self.collect_evaluation(round_, replies).items():
                if pid in node_metrics:
                    node_metrics[pid].update(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """An evaluate message to each node that replied to this round's training."""
        marker = ConfigRecord({"round": server_round})
        return [Message(RecordDict({EVALUATE_KEY: marker, "config": config}),
                        dst_node_id=self.members.node_ids[pid], message_type="evaluate",
                        group_id=f"{server_round}.evaluate")
                for pid in self.loop.routing.trained_in(server_round)
                if pid in self.members.node_ids]

    def collect_evaluation(self, round_: int, replies: Exchange) -> NodeMetrics:
        """Each node's evaluation metrics, the user's accuracy and loss metrics also as
        ``accuracy`` and ``loss``."""
        evaluated = {}
        for pid, reply in replies.replies.items():
            if reply.has_error() or "metrics" not in reply.content.metric_records:
                log.warning("round %s: no evaluation from partition %s: %s", round_, pid,
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

    ``settings`` are RunConfig fields (e.g. ``density=0.5``, ``server_eval_every``) and
    fields of the algorithm's settings (HyperPrism's ``p_mode``); those of the native apps'
    data, model and training (``NATIVE_ONLY``, the settings' ``native_only``) are an
    error. ``num_nodes`` defaults to the federation's num-partitions;
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
    spec = algorithm_spec(algorithm)
    native = sorted(set(settings) & {*NATIVE_ONLY, *spec.settings.native_only})
    if native:
        raise ValueError(f"{', '.join(native)}: settings of the native apps' data, model and "
                         f"training; in plug-in mode your ClientApp owns these, remove them")
    config = RunConfig.build(algorithm, **settings)
    if config.order != "atc":
        raise ValueError(f"order={config.order!r} is not available in plug-in mode (the user's "
                         f"handler trains the merged model): use order='atc'")
    spec.check(config)
    root = default_run_root()
    run_dir = root / (run_dir if run_dir is not None else
                      f"{algorithm}-plugin-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    return PluginStrategy(RoundLoop(spec.plan(config), run_dir, on_round),
                          accuracy_metric=accuracy_metric, loss_metric=loss_metric,
                          num_nodes_from_federation="num_nodes" not in settings,
                          lr_key=None if "lr" in settings else lr_key,
                          train_config_fn=train_config_fn)


def default_run_root() -> Path:
    """Where plug-in runs write their outputs: ``$FLWR_HOME/hyperprism-runs`` (FLWR_HOME
    defaults to ~/.flwr), an absolute directory outside any FAB."""
    return Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser().resolve() / "hyperprism-runs"
