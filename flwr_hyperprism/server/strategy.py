"""The Flower ``Strategy`` of every decentralized algorithm: a thin adapter over the
orchestrator's parts (``flwr_hyperprism/orchestration``). It only routes: each round-trip every
bound node gets its task and its neighbours' latest models untouched. ``start`` replaces
Flower's own loop (there is no global model to aggregate)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_hyperprism.messages import protocol
from flwr_hyperprism.orchestration import evaluation, membership, routing, transport
from flwr_hyperprism.orchestration.rounds import NodeMetrics, RoundCallback, RoundLoop, round_loop
from flwr_hyperprism.setup.config import RunConfig

log = logging.getLogger("flwr")
Models = dict[int, ArrayRecord]
OWN_LOOP = ("DecentralizedStrategy runs its rounds in start() (replies are attributed to "
            "partitions per exchange); call start() instead of Flower's aggregate_* hooks")


def make_strategy(config: RunConfig, run_dir: str | Path | None = None) -> DecentralizedStrategy:
    """The Flower strategy of ``config.algorithm`` (outputs in ``run_dir``)."""
    return DecentralizedStrategy(round_loop(config, run_dir))


class DecentralizedStrategy(Strategy):
    """Routing-only orchestrator over Flower: round-trips, no global model.

    ``loop``: the plan's rounds, routing table and run store; ``members``: which node serves
    which partition; ``final_models``: each partition's model after the run. Train messages go
    to ``train.<algorithm>`` (the native ClientApp's handlers) unless ``train_message_type``
    names one type for all (plug-in mode: "train").
    """

    def __init__(self, loop: RoundLoop, query_type: str = "query.info",
                 train_message_type: str | None = None) -> None:
        self.loop, self.members = loop, membership.Membership(query_type)
        self.train_message_type = train_message_type
        self.final_models: Models = {}
        self._sent_config: RunConfig | None = None  # the run config the nodes were last sent

    @property
    def config(self) -> RunConfig:
        return self.loop.config

    @property
    def run_dir(self) -> Path | None:
        """Where the run's outputs go (metrics.jsonl, summary.json, config.json)."""
        return self.loop.store.run_dir

    @property
    def on_round(self) -> RoundCallback | None:
        """Called with every metrics row and the round's models (``RoundCallback``)."""
        return self.loop.on_round

    @on_round.setter
    def on_round(self, callback: RoundCallback | None) -> None:
        self.loop.on_round = callback

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """A train message per node, for its bound partitions (``routing.train_content``).
        ``config[STAGE_KEY]``
        (default 0) selects the round's stage, ``REPORT_KEY`` asks for the nodes' models; the
        rest is passed on as the message's "config"."""
        stage = protocol.record_int(config, protocol.STAGE_KEY) \
            if protocol.STAGE_KEY in config else 0
        passed_on = ConfigRecord({k: v for k, v in config.items()
                                  if k not in (protocol.STAGE_KEY, protocol.REPORT_KEY)})
        kind = self.train_message_type or f"train.{self.loop.plan.algorithm}"
        return [Message(content, dst_node_id=nid, message_type=kind,
                        group_id=f"{server_round}.{stage}")
                for nid, content in self.train_contents(
                    server_round, stage, passed_on, protocol.REPORT_KEY in config).items()]

    def train_contents(self, round_: int, stage: int, passed_on: ConfigRecord,
                       report: bool = False) -> dict[int, RecordDict]:
        """{node id: its train message's content} for the bound partitions. The run config goes
        once per run: again only to a node that may not hold it, and to all when it changes
        (plug-in lr schedules)."""
        config = self.round_config(passed_on)
        changed, self._sent_config = config != self._sent_config, config
        session = {protocol.SESSION_KEY: ConfigRecord({"run-key": self.loop.store.run_key}),
                   "config": passed_on}
        tasks = {pid: task for pid, task in self.loop.tasks(round_, stage).items()
                 if pid in self.members.node_ids}
        in_sync = self.members.in_sync
        return routing.train_contents(tasks, self.members.node_ids, self.loop.routing, session,
                                      protocol.run_record(config), in_sync,
                                      set() if changed else in_sync, report)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise NotImplementedError(OWN_LOOP)

    def collect_train(self, round_: int, replies: transport.Exchange, label: str = ""
                      ) -> tuple[NodeMetrics, Models]:
        """Route the replying nodes' new shared tensors; their metrics and reported models."""
        results = transport.train_results(replies, self.members.node_ids,
                                          label or f"round {round_}", self.config.round_timeout,
                                          self.config.num_nodes)
        for pid, shared in results.shared.items():
            self.loop.routing.store(pid, shared, round_)
        self.members.replied(replies.partitions, set(results.metrics))
        return results.metrics, results.models

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """None: nodes evaluate inside their train reply (plug-in mode sends some)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        raise NotImplementedError(OWN_LOOP)

    def summary(self) -> None:
        self.loop.log_summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None,
              num_rounds: int | None = None, timeout: float | None = None,
              train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: evaluation.EvaluateFn | None = None) -> Result:
        """Run the decentralized rounds; same signature as ``Strategy.start``.

        ``initial_arrays`` is routed as every node's latest model in round 1. There is no
        global model: ``evaluate_fn(round, arrays)`` scores each node's model of the round
        (``orchestration.evaluation``), into the rows as ``server_<name>``; ``result.arrays``
        is the average of the finite final models (``final_models``).
        """
        self.loop.reconfigure(num_rounds=num_rounds, round_timeout=timeout)
        self.prepare(grid, train_config)
        self.summary()
        self._sent_config = None
        resumed = self.loop.open(initial_arrays, ArrayRecord, self.described_settings())
        self.members.bind(membership.wait_for_partitions(
            grid, self.config.num_nodes, self.config.node_wait_timeout, self.members.query_type,
            self.config), in_sync=not resumed)  # a resumed run's nodes start from checkpoints
        arrays = initial_arrays or ArrayRecord()
        self.check_evaluate_config(evaluate_config)
        wants_models = evaluate_fn is not None or self.loop.on_round is not None
        scored = evaluation.server_eval_partitions(self.config)

        def round_trip(round_: int, stage: int) -> tuple[NodeMetrics, Models]:
            self.members.refresh(grid, round_, self.config)
            config = ConfigRecord({**(train_config or {}), protocol.STAGE_KEY: stage})
            if evaluation.reports_models(self.config, round_, stage, wants_models):
                config[protocol.REPORT_KEY] = True
            label = f"round {round_}" + (f" exchange {stage + 1}" if stage else "")
            sent = self.exchange(grid, self.configure_train(round_, arrays, config, grid), label)
            node_metrics, reported = self.collect_train(round_, sent, label)
            if evaluate_fn is not None:
                evaluation.score_on_server(evaluate_fn, round_ - 1, reported, scored,
                                           node_metrics)
            if round_ == self.config.num_rounds + 1:
                self.final_models = dict(reported)
            if stage == 0:
                self.evaluate_round(grid, round_, arrays, evaluate_config or ConfigRecord(),
                                    node_metrics)
            return node_metrics, reported

        rows = self.loop.run(round_trip)
        return evaluation.run_result(rows, evaluation.finite_average(self.final_models,
                                                                     self.loop.store))

    def exchange(self, grid: Grid, messages: Iterable[Message], label: str
                 ) -> transport.Exchange:
        """Send ``messages`` to bound nodes; their replies attributed to partitions."""
        return transport.exchange(grid, messages, self.members.partitions_on,
                                  self.config.round_timeout, label)

    # --- hooks plug-in mode (``flwr_hyperprism.server.plugin``) changes -----------------------

    def prepare(self, grid: Grid, train_config: ConfigRecord | None) -> None:
        """Settings ``start`` takes from the federation or the train config (none here)."""

    def described_settings(self) -> dict[str, object]:
        """What the run's config.json says about it: the run's and its algorithm's settings."""
        return dict(self.config.to_run_config())

    def round_config(self, passed_on: ConfigRecord) -> RunConfig:
        """The run config a round-trip's train messages carry; the run's own here."""
        return self.config

    def evaluate_round(self, grid: Grid, round_: int, arrays: ArrayRecord,
                       evaluate_config: ConfigRecord, node_metrics: NodeMetrics) -> None:
        """Add evaluation metrics to ``node_metrics`` after a round's first exchange; none
        here: nodes evaluate in their train reply."""

    def check_evaluate_config(self, evaluate_config: ConfigRecord | None) -> None:
        """Warn that ``evaluate_config`` has no use here (no evaluate messages are sent)."""
        if evaluate_config:
            log.warning("evaluate_config %s is not used: %s nodes evaluate in their train "
                        "reply (use train_config for settings they need)", dict(evaluate_config),
                        self.loop.plan.description)
