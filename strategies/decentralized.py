"""The Flower strategy shared by every decentralized algorithm, and the in-process driver.

``DecentralizedStrategy`` carries out an algorithm's ``RoutingPlan`` (``strategies/plan.py``)
over Flower: each round it asks the plan for every node's task, sends it with the neighbours'
latest models untouched (message keys: ``strategies/protocol.py``), and collects the replies.
It never does arithmetic on parameters. Nodes hold their own state and run the algorithm's
``NodeRule``. ``run_in_process`` drives the same plan and node rules without Flower.

Round protocol (one Flower round-trip per round): in round-trip t a node merges the models its
neighbours trained in round-trip t-1, evaluates the merged model, trains it locally and replies.
The merge completes round t-1 of the paper's adapt-then-combine loop, so the metrics of
round-trip t describe the model after round t-1 (round 0: the initial model). T rounds take
T + 1 round-trips; the last one merges and evaluates without training. An algorithm that needs
several exchanges per round (Mudag) splits round t into stages 0..K-1, one round-trip each;
stage 0 evaluates, and the metrics rows count the exchanges (``exchanges``) next to the rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar
from uuid import uuid4

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.graphs import round_rng
from flwr_hyperprism.metrics import RunRecorder, format_round, summarise_round

from . import algorithm_spec, learner
from .checkpoint import RoutingCheckpoint, node_checkpoints, starting_state
from .plan import RoutingPlan
from .protocol import (
    INFO_KEY,
    MODEL_KEY,
    NEIGHBOUR_PREFIX,
    OWN_KEY,
    REPORT_KEY,
    RUN_KEY,
    SESSION_KEY,
    STAGE_KEY,
    TASK_KEY,
    record_int,
    run_record,
    scalar_metrics,
    task_record,
)
from .rule import NodeRule, NodeState, NodeTask, StateDict
from .screening import nonfinite_fault

log = logging.getLogger("flwr")

RoundCallback = Callable[[dict[str, Any], dict[int, ArrayRecord]], None]
"""``on_round(row, models)``: called after each metrics row is recorded, with the row and the
nodes' models of that round ({partition id: model}; empty in rounds that use none)."""



def make_strategy(config: RunConfig, run_dir: str | Path | None = None
                  ) -> DecentralizedStrategy:
    """The Flower strategy that carries out ``config.algorithm``'s plan (outputs in
    ``run_dir``)."""
    spec = algorithm_spec(config.algorithm)
    spec.check(config)
    return DecentralizedStrategy(spec.orchestrator(config), run_dir)


class DecentralizedStrategy(Strategy):
    """Routing-only orchestrator: Flower round-trips, no global model.

    Round t: sample G(t); send node i its ``NodeTask`` and the latest model of each neighbour
    (as received, untouched); collect every node's new model and metrics; repeat for each of
    the round's ``stages``. Metrics are logged per round and, with ``run_dir``, written to
    metrics.jsonl / summary.json there, next to a routing checkpoint (``routing.pt``) from
    which ``resume=true`` continues the run.

    Membership is elastic: before each round-trip the orchestrator drops partitions whose node
    left the federation, asks nodes that (re)appeared for their partition and binds them. A
    partition's latest model stays routed while it is at most ``max-staleness`` rounds old.
    """

    info_message_type: ClassVar[str] = "query.info"  # the partition-id request (query.info)

    @property
    def config(self) -> RunConfig:
        """The run's settings, which are its plan's (``start`` may set the rounds)."""
        return self.routing.config

    @config.setter
    def config(self, config: RunConfig) -> None:
        self.routing.config = config

    @property
    def train_message_type(self) -> str:
        """Train messages go to the ClientApp's ``train.<algorithm>`` handler."""
        return f"train.{self.routing.algorithm}"

    def __init__(self, routing: RoutingPlan, run_dir: str | Path | None = None,
                 on_round: RoundCallback | None = None) -> None:
        self.routing = routing  # the algorithm's plan: who hears from whom, with what weights
        self.on_round = on_round
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.recorder: RunRecorder | None = None  # made when the run opens (``open_run``)
        self.run_key = ""  # names the nodes' checkpoints of this run (``open_run``)
        self.next_exchange = 0  # index in ``schedule()`` of the next round-trip
        # routing state (checkpointed): partition id -> latest shared tensors and their round
        # (ArrayRecords in a Flower run, the state dicts themselves in ``run_in_process``)
        self.latest: dict[int, Any] = {}
        self.received: dict[int, int] = {}
        self.dropped: dict[int, float] = {}  # neighbours dropped in stages > 0, per node
        self.stale: list[int] = []  # partitions left out of the last round-trip as too old
        # membership (Flower runs)
        self.node_ids: dict[int, int] = {}  # partition id -> Flower node id bound to it
        self.claims: dict[int, int | None] = {}  # node id -> its partition (None: unusable)
        self.retired: set[int] = set()  # node ids a partition moved away from
        self.joining: dict[str, int] = {}  # message id of a pending partition query -> node id
        self.in_sync: set[int] = set()  # partitions whose node holds the state ``latest`` has
        self.addressed: dict[str, int] = {}  # message id -> partition, of the last exchange
        # the nodes' models of the round (MODEL_KEY replies), when the exchange asked for them
        self.reported: dict[int, ArrayRecord] = {}
        self.final_models: dict[int, ArrayRecord] = {}  # each partition's model after the run

    # --- routing: the plan over the partitions that have a model to route -----------------

    def routable(self, round_: int) -> set[int]:
        """Partitions whose latest model may be routed in round ``round_``: it has missed at
        most ``max-staleness`` rounds (a model from round t - 1 has missed none)."""
        return {pid for pid in self.latest
                if round_ - 1 - self.received.get(pid, 0) <= self.config.max_staleness}

    def plan(self, round_: int, stage: int) -> dict[int, NodeTask]:
        """``plan_round`` over the routable partitions; notes the stale ones in ``stale``."""
        available = self.routable(round_)
        self.stale = sorted(set(self.latest) - available)
        return self.routing.plan_round(round_, available, stage)

    # --- Flower hooks ------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Per-node messages: task, run config, and the neighbours' latest models.

        Only partitions bound to a node get a message. A partition whose node does not hold
        the state behind its latest model (it failed, was silent, or just (re)joined) also
        gets that model as ``OWN_KEY``, to restart from if it has no state of its own.
        ``config[STAGE_KEY]`` (default 0) selects the stage of round ``server_round``; the rest
        of ``config`` is passed on as the message's "config" record.
        """
        stage = record_int(config, STAGE_KEY) if STAGE_KEY in config else 0
        passed_on = ConfigRecord({k: v for k, v in config.items()
                                  if k not in (STAGE_KEY, REPORT_KEY)})
        return [Message(content, dst_node_id=self.node_ids[pid],
                        message_type=self.train_message_type,
                        group_id=f"{server_round}.{stage}")
                for pid, content in self.train_contents(server_round, stage, passed_on,
                                                        REPORT_KEY in config).items()]

    def train_contents(self, round_: int, stage: int, passed_on: ConfigRecord,
                       report: bool = False) -> dict[int, RecordDict]:
        """The content of each bound partition's train message (see ``configure_train``);
        with ``report`` the nodes are asked for their model of the round (``MODEL_KEY``)."""
        run = run_record(self.round_config(passed_on))
        session = ConfigRecord({"run-key": self.run_key})
        contents = {}
        for pid, task in self.plan(round_, stage).items():
            if pid not in self.node_ids:
                continue
            content = RecordDict({TASK_KEY: task_record(task), RUN_KEY: run, SESSION_KEY: session,
                                  "config": passed_on})
            for j in task.neighbours:
                content[f"{NEIGHBOUR_PREFIX}{j}"] = self.latest[j]
            if pid not in self.in_sync and pid in self.latest:
                content[OWN_KEY] = self.latest[pid]
            if report:
                content[REPORT_KEY] = ConfigRecord()
            contents[pid] = content
        return contents

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``collect_train``; no global model: None arrays, and the metrics summarised over the
        nodes that replied."""
        node_metrics = self.collect_train(server_round, replies)
        return None, flat_metrics(summarise_round(server_round - 1, node_metrics))

    def collect_train(self, server_round: int, replies: Iterable[Message]
                      ) -> dict[int, dict[str, float]]:
        """Store each node's new shared tensors for routing; each replying partition's metrics.

        Replies are attributed to the partition their message went to (``addressed``, by
        ``reply_to_message_id``), so error replies the SuperLink writes for an unreachable
        node count too. A node that failed (error reply) or did not reply in time is logged;
        its last model stays routed and it gets its next task as usual.
        """
        node_metrics = {}
        failed = []
        for reply in replies:
            pid = self.addressed.get(reply.metadata.reply_to_message_id)
            if pid is None:
                log.warning("round %s: ignored a reply to unknown message %s from node %s",
                            server_round, reply.metadata.reply_to_message_id,
                            reply.metadata.src_node_id)
                continue
            fault = reply_fault(reply)
            if fault is not None:
                log.error("round %s: node %s (partition %s) failed: %s", server_round,
                          self.node_ids.get(pid), pid, fault)
                failed.append(pid)
                continue
            self.latest[pid] = reply.content.array_records["arrays"]
            self.received[pid] = server_round
            if MODEL_KEY in reply.content.array_records:
                self.reported[pid] = reply.content.array_records[MODEL_KEY]
            node_metrics[pid] = scalar_metrics(reply.content.metric_records["metrics"])
        addressed = set(self.addressed.values())
        silent = sorted(addressed - set(node_metrics) - set(failed))
        if silent:
            log.error("round %s: no reply within round-timeout=%ss from partitions %s",
                      server_round, self.config.round_timeout, silent)
        if len(node_metrics) < self.config.num_nodes:
            log.warning("round %s: %s of %s partitions replied; missing %s keep their last "
                        "routed model", server_round, len(node_metrics), self.config.num_nodes,
                        sorted(set(range(self.config.num_nodes)) - set(node_metrics)))
        self.in_sync = (self.in_sync - addressed) | set(node_metrics)
        return node_metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No evaluation round-trip: nodes evaluate inside the training reply.

        (``start`` sends what this returns after each round's stage-0 train round-trip and
        adds ``collect_evaluation`` of the replies to the round's metrics.)
        """
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """``collect_evaluation`` summarised over the nodes (None: no evaluation)."""
        node_metrics = self.collect_evaluation(server_round, replies)
        return flat_metrics(summarise_round(server_round - 1, node_metrics)) \
            if node_metrics else None

    def collect_evaluation(self, server_round: int, replies: Iterable[Message]
                           ) -> dict[int, dict[str, float]]:
        """Each partition's metrics from the replies to ``configure_evaluate`` (none here)."""
        return {}

    def summary(self) -> None:
        log.info("%s: %s nodes, %s graph (density %s), %s rounds, dataset %s, model %s",
                 self.routing.description, self.config.num_nodes, self.config.topology,
                 self.config.density, self.config.num_rounds, self.config.dataset,
                 self.config.model)

    # --- membership --------------------------------------------------------------------------

    def refresh_nodes(self, grid: Grid, round_: int) -> None:
        """Follow the federation before a round-trip: nodes that left, nodes that joined.

        A partition whose node is no longer connected is unbound (its latest model stays
        routed while it is fresh enough). Every connected node not seen before is asked for
        its partition; the query is not waited for, its answer is read at a later round-trip.
        A node that claims an unbound partition, or one whose node did not reply to its last
        message, is bound to it (a restarted SuperNode comes back under a new node id while
        the SuperLink may still list the old one); a node that claims a partition held by a
        node that replies stays idle (a duplicate), with one warning.
        """
        online = set(grid.get_node_ids())
        for partition, nid in sorted(self.node_ids.items()):
            if nid not in online:
                log.warning("round %s: partition %s lost its node %s (disconnected)", round_,
                            partition, nid)
                del self.node_ids[partition]
                self.in_sync.discard(partition)
        self.claims = {nid: pid for nid, pid in self.claims.items() if nid in online}
        self._read_partition_answers(grid, round_)
        asking = set(self.joining.values())
        new = sorted(online - set(self.claims) - asking)
        if new:
            queries = [partition_query(nid, self.info_message_type, self.config) for nid in new]
            self.joining.update(zip(grid.push_messages(queries), new))
        for nid, pid in sorted(self.claims.items()):
            if pid is None or nid in self.retired or self.node_ids.get(pid) == nid:
                continue
            holder = self.node_ids.get(pid)
            if holder is not None and pid in self.in_sync:
                log.warning("round %s: node %s also claims partition %s, held by node %s, "
                            "which replies; node %s stays idle", round_, nid, pid, holder, nid)
                self.retired.add(nid)
                continue
            log.warning("round %s: partition %s %s on node %s", round_, pid,
                        "joins" if holder is None else f"moves from node {holder}", nid)
            if holder is not None:
                self.retired.add(holder)
            self.node_ids[pid] = nid
            self.in_sync.discard(pid)

    def _read_partition_answers(self, grid: Grid, round_: int) -> None:
        if not self.joining:
            return
        for reply in grid.pull_messages(list(self.joining)):
            nid = self.joining.pop(reply.metadata.reply_to_message_id, None)
            if nid is None:
                continue
            if reply.has_error():  # e.g. it went away again: asked anew if it comes back
                log.warning("round %s: node %s did not say its partition: %s", round_, nid,
                            reply.error.reason)
                continue
            try:
                self.claims[nid] = partition_answer(reply, self.config.num_nodes)
            except RuntimeError as err:
                log.error("round %s: node %s cannot join: %s", round_, nid, err)
                self.claims[nid] = None

    # --- the round loop ----------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None,
              num_rounds: int | None = None, timeout: float | None = None,
              train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              ) -> Result:
        """Run the decentralized rounds; same signature as ``Strategy.start``.

        ``initial_arrays`` (the common initial model) is routed as every node's latest model
        in round 1. There is no global model: ``evaluate_fn(round, arrays)`` scores each
        node's model of the round instead (every ``server-eval-every`` rounds and after the
        last, each node or a fixed sample of ``server-eval-nodes``), the paper's per-device
        metric; its metrics go into the rows per node as ``server_<name>`` (mean, std and per
        partition) and their means into ``result.evaluate_metrics_serverapp``. The nodes send
        those models only in the rounds that use them. ``result.train_metrics_clientapp[r]``
        holds round r's aggregates, r = 0..num_rounds (per-node values as
        ``<key>.<partition id>``). ``result.arrays`` is the network average of the nodes'
        final models (reported, never routed to a node); ``final_models`` has each of them.
        ``evaluate_config`` goes to the evaluate messages of ``configure_evaluate``; this
        strategy sends none (its nodes evaluate in their train reply) and warns if given one.
        """
        if num_rounds is not None and num_rounds != self.config.num_rounds:
            self.config = self.config.replace(num_rounds=num_rounds)
        if timeout is not None and timeout != self.config.round_timeout:
            self.config = self.config.replace(round_timeout=timeout)
        timeout = self.config.round_timeout
        self.prepare(grid, train_config)
        self.summary()
        resumed = self.open_run(initial_arrays if self.routing.routes_initial_model else None,
                                ArrayRecord)
        self.node_ids = wait_for_partitions(grid, self.config.num_nodes,
                                            self.config.node_wait_timeout, self.info_message_type,
                                            self.config)
        self.claims = {nid: pid for pid, nid in self.node_ids.items()}
        # a fresh run's nodes start from the initial model; a resumed run's from checkpoints
        self.in_sync = set() if resumed else set(self.node_ids)
        result = Result()
        arrays = initial_arrays or ArrayRecord()
        self.check_evaluate_config(evaluate_config)
        wants_models = evaluate_fn is not None or self.on_round is not None
        eval_partitions = self.server_eval_partitions()

        def round_trip(round_: int, stage: int) -> dict[int, dict]:
            self.refresh_nodes(grid, round_)
            config = ConfigRecord({**(train_config or {}), STAGE_KEY: stage})
            report = stage == 0 and (round_ == self.config.num_rounds + 1 or wants_models and
                                     (round_ - 1) % self.config.server_eval_every == 0)
            if report:
                config[REPORT_KEY] = True
            self.reported = {}
            replies = self.exchange(grid, self.configure_train(round_, arrays, config, grid),
                                    timeout, f"round-trip {round_}.{stage}")
            node_metrics = self.collect_train(round_, replies)
            if evaluate_fn is not None:
                for pid in sorted(set(self.reported) & eval_partitions):
                    scored = evaluate_fn(round_ - 1, self.reported[pid])
                    if scored is not None and pid in node_metrics:
                        node_metrics[pid].update(
                            (f"server_{k}", v) for k, v in scalar_metrics(scored).items())
            if round_ == self.config.num_rounds + 1:
                self.final_models = dict(self.reported)
            if stage == 0:
                evaluation = list(self.configure_evaluate(round_, arrays,
                                                          evaluate_config or ConfigRecord(), grid))
                if evaluation:
                    replies = self.exchange(grid, evaluation, timeout, f"evaluation {round_}")
                    for pid, metrics in self.collect_evaluation(round_, replies).items():
                        if pid in node_metrics:
                            node_metrics[pid].update(metrics)
            return node_metrics

        for row in self.run_rounds(round_trip):
            result.train_metrics_clientapp[row["round"]] = flat_metrics(row)
            server = {k[len("server_"):-len("_mean")]: v for k, v in row.items()
                      if k.startswith("server_") and k.endswith("_mean")}
            if server:
                result.evaluate_metrics_serverapp[row["round"]] = MetricRecord(server)
        result.arrays = self.finite_average()
        return result

    def finite_average(self) -> ArrayRecord:
        """The network average of the finite final models (``result.arrays``); a partition
        whose final model is not finite is left out with a warning and makes the run not
        ``complete`` in summary.json. Empty when no final model is finite."""
        nonfinite = sorted(pid for pid, model in self.final_models.items()
                           if nonfinite_fault(as_state_dict(model)) is not None)
        if nonfinite:
            log.warning("the final models of partitions %s are not finite: result.arrays "
                        "averages the other %s", nonfinite, len(self.final_models) - len(nonfinite))
            if self.recorder is not None:
                self.recorder.final_models_nonfinite(nonfinite)
        finite = {pid: m for pid, m in self.final_models.items() if pid not in nonfinite}
        if self.final_models and not finite:
            log.error("no final model is finite: result.arrays is empty")
        return network_average(finite) if finite else ArrayRecord()

    def prepare(self, grid: Grid, train_config: ConfigRecord | None) -> None:
        """Settings ``start`` takes from the federation or the train config (none here)."""

    def described_settings(self) -> dict[str, object]:
        """What the run's config.json says about it: every RunConfig field."""
        return dict(self.config.to_run_config())

    def round_config(self, passed_on: ConfigRecord) -> RunConfig:
        """The run config a round-trip's train messages carry (``passed_on``: its train
        config); the run's own here."""
        return self.config

    def server_eval_partitions(self) -> set[int]:
        """The partitions ``evaluate_fn`` scores (when they report a model): all, or the same
        seeded sample of ``server-eval-nodes`` partitions every round."""
        wanted, num_nodes = self.config.server_eval_nodes, self.config.num_nodes
        if wanted == 0 or wanted >= num_nodes:
            return set(range(num_nodes))
        sample = round_rng(self.config.seed, 0, 0x5E).choice(num_nodes, wanted, replace=False)
        return {int(pid) for pid in sample}

    def check_evaluate_config(self, evaluate_config: ConfigRecord | None) -> None:
        """Warn that ``evaluate_config`` has no use here (no evaluate messages are sent)."""
        if evaluate_config:
            log.warning("evaluate_config %s is not used: %s nodes evaluate in their train "
                        "reply (use train_config for settings they need)", dict(evaluate_config),
                        self.routing.description)

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float,
                 label: str) -> list[Message]:
        """Send ``messages`` to bound nodes and return the replies; ``addressed`` maps each
        sent message's id to its partition (the aggregate methods attribute replies by it)."""
        partition_of = {nid: pid for pid, nid in self.node_ids.items()}
        sent, replies = send_and_receive(
            grid, messages, timeout, label=label,
            describe=lambda m: f"partition {partition_of.get(m.metadata.dst_node_id)}")
        self.addressed = {mid: partition_of[msg.metadata.dst_node_id]
                          for mid, msg in sent.items()}
        return replies

    def open_run(self, initial: ArrayRecord | StateDict | None,
                 routed_form: Callable[[StateDict], ArrayRecord | StateDict]) -> bool:
        """Open the run's outputs; with ``resume``, restore the routing state. Returns whether
        the run resumes.

        Fresh: ``initial`` (if any) becomes every partition's latest model. Resume: the
        routing checkpoint of ``run_dir`` gives the latest models (``routed_form`` turns its
        tensors into what ``latest`` holds), the round-trip to continue from and the rows to
        keep. A run directory that already holds rows is never overwritten: without
        ``resume`` that is an error, as is resuming with other settings.
        """
        self.latest, self.received, self.dropped, self.next_exchange = {}, {}, {}, 0
        checkpoint, run_dir = None, self.run_dir
        if self.config.resume:
            if run_dir is None:
                raise ValueError("resume=true needs a run directory (output-dir/run-name) "
                                 "to resume from")
            checkpoint = RoutingCheckpoint.load(run_dir)
            if checkpoint is None:
                log.warning("resume=true, but %s holds no routing checkpoint: starting at "
                            "round 0", run_dir)
        if checkpoint is None:
            self.run_key = f"{self.run_dir.name if self.run_dir else 'run'}-{uuid4().hex[:8]}"
            if initial is not None:
                self.latest = dict.fromkeys(range(self.config.num_nodes), initial)
                self.received = dict.fromkeys(range(self.config.num_nodes), 0)
        else:
            assert run_dir is not None  # only a resumed run has a checkpoint
            check_resumable(checkpoint.config, self.config, run_dir)
            self.run_key, self.next_exchange = checkpoint.run_key, checkpoint.next_exchange
            self.latest = {pid: routed_form(tensors) for pid, tensors in checkpoint.latest.items()}
            self.received, self.dropped = checkpoint.received, checkpoint.dropped
            log.info("resuming %s after %s of its round-trips (%s rows)", self.run_dir,
                     checkpoint.next_exchange, checkpoint.rows)
        if self.run_dir is not None:
            self.recorder = RunRecorder(self.run_dir, self.config, self.routing.description,
                                        keep_rows=checkpoint.rows if checkpoint else None,
                                        settings=self.described_settings())
        return checkpoint is not None

    def save_checkpoint(self) -> None:
        """Write the routing checkpoint (with a run directory only)."""
        if self.run_dir is None or self.recorder is None:
            return
        RoutingCheckpoint(
            self.run_key, self.next_exchange, len(self.recorder.rows),
            {pid: as_state_dict(model) for pid, model in self.latest.items()},
            dict(self.received), dict(self.dropped), self.config.to_run_config(),
        ).save(self.run_dir)

    def run_rounds(self, round_trip: Callable[[int, int], Mapping[int, Mapping[str, float]]]
                   ) -> list[dict]:
        """The round loop shared by Flower and in-process runs; returns the metrics rows.

        ``round_trip(round, stage)`` does one exchange and returns each replying node's
        metrics. Stage 0 of round t evaluates the model after round t - 1: its metrics make
        that round's row, with ``exchanges`` (round-trips whose vectors reached that model),
        ``seconds`` (wall time since the previous row), ``neighbours_dropped`` counted over
        every exchange since the previous row, ``partitions_missing`` (no reply) and
        ``partitions_stale`` (not routed: too old). Round-trips before ``next_exchange`` (a
        resumed run) are skipped; the routing checkpoint is written after each one.
        """
        rows = list(self.recorder.rows) if self.recorder is not None else []
        started = time.perf_counter()
        everyone = set(range(self.config.num_nodes))
        for exchanges, (round_, stage) in enumerate(self.routing.schedule()):
            if exchanges < self.next_exchange:
                continue
            node_metrics = round_trip(round_, stage)
            for pid, metrics in node_metrics.items():
                self.dropped[pid] = (self.dropped.get(pid, 0.0)
                                     + metrics.get("neighbours_dropped", 0.0))
            if stage == 0:
                node_metrics = {pid: {**metrics, "neighbours_dropped": self.dropped.pop(pid)}
                                for pid, metrics in node_metrics.items()}
                rows.append({**summarise_round(round_ - 1, node_metrics),
                             "partitions_missing": sorted(everyone - set(node_metrics)),
                             "partitions_stale": list(self.stale),
                             "exchanges": exchanges, "seconds": time.perf_counter() - started})
                self.record_round(rows[-1])
                if self.on_round is not None:
                    self.on_round(rows[-1], dict(self.reported))
                started = time.perf_counter()
                self.dropped.clear()
            self.next_exchange = exchanges + 1
            self.save_checkpoint()
        return rows

    def record_round(self, row: dict) -> None:
        """Log one metrics row and append it, naming the algorithm, to the run's files."""
        log.info("[%s] %s", self.routing.algorithm, format_round(row, self.config.num_rounds))
        if self.recorder is not None:
            self.recorder.record({"algorithm": self.routing.algorithm, **row})


# Settings a resumed run may change: they do not change what the nodes compute.
RESUMABLE_CHANGES = ("resume", "round_timeout", "node_wait_timeout", "output_dir", "state_dir")


def check_resumable(saved: Mapping[str, object], config: RunConfig, run_dir: Path) -> None:
    """Raise ValueError naming the settings that differ from the checkpointed run's."""
    current = config.to_run_config()
    allowed = {key.replace("_", "-") for key in RESUMABLE_CHANGES}
    changed = sorted(key for key in set(saved) | set(current)
                     if key not in allowed and saved.get(key) != current.get(key))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {run_dir} with other settings ({detail}); resume "
                         f"with the run's own settings or start a new run-name")


def network_average(models: Mapping[int, ArrayRecord]) -> ArrayRecord:
    """The mean of the nodes' models: floating-point tensors averaged (in float64, cast
    back), the others (e.g. BatchNorm's counters) taken from the lowest partition id."""
    states = [models[pid].to_torch_state_dict() for pid in sorted(models)]
    mean = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = torch.stack([s[key].double() for s in states]).mean(dim=0)
            mean[key] = total.to(first.dtype)
        else:
            mean[key] = first
    return ArrayRecord(mean)


def as_state_dict(model: ArrayRecord | StateDict) -> StateDict:
    """Tensors of a routed model (an ArrayRecord in Flower runs, a dict in-process)."""
    if isinstance(model, ArrayRecord):
        return dict(model.to_torch_state_dict())
    return model


def flat_metrics(row: Mapping[str, Any]) -> MetricRecord:
    """A metrics row as a MetricRecord: per-node dicts become ``<key>.<partition>``."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{pid}": v for pid, v in value.items()})
        elif not isinstance(value, str):
            flat[key] = value
    return MetricRecord(flat)


def reply_fault(reply: Message) -> str | None:
    """Why a train reply carries no usable result (None if it does)."""
    if reply.has_error():
        return reply.error.reason
    if not reply.has_content() or "arrays" not in reply.content or \
            "metrics" not in reply.content:
        return "the reply has no 'arrays' and 'metrics' records"
    return None


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                     max_poll: float = 0.1, label: str = "round-trip",
                     describe: Callable[[Message], str] | None = None,
                     report_every: float = 5.0) -> tuple[dict[str, Message], list[Message]]:
    """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds pass.

    Like ``Grid.send_and_receive``, but polls every 5 ms growing to ``max_poll`` seconds: the
    deployed Grid sleeps 3 s between pulls, longer than a whole round of a small model. Every
    ``report_every`` seconds it logs who is still missing (``describe`` names a message's
    destination). Returns {message id: message as sent} and the replies.
    """
    messages = list(messages)
    describe = describe or (lambda m: f"node {m.metadata.dst_node_id}")
    sent = dict(zip(grid.push_messages(messages), messages))
    pending = set(sent)
    begun = time.monotonic()
    deadline, next_report = begun + timeout, begun + report_every
    replies: list[Message] = []
    poll = 0.005
    while pending:
        received = list(grid.pull_messages(pending))
        replies.extend(received)
        pending.difference_update(m.metadata.reply_to_message_id for m in received)
        now = time.monotonic()
        if not pending or now >= deadline:
            break
        if now >= next_report:
            log.info("%s: %s of %s replies after %.0fs; waiting for %s (up to %.0fs more)",
                     label, len(sent) - len(pending), len(sent), now - begun,
                     ", ".join(sorted(describe(sent[mid]) for mid in pending)), deadline - now)
            next_report += report_every
        time.sleep(poll)
        poll = min(2 * poll, max_poll)
    return sent, replies


def partition_query(node_id: int, message_type: str, run_config: RunConfig | None
                    ) -> Message:
    """A request for a node's partition id (with the run config, so that the node can check
    that it can load its data)."""
    content = RecordDict({INFO_KEY: ConfigRecord()})
    if run_config is not None:
        content[RUN_KEY] = run_record(run_config)
    return Message(content, dst_node_id=node_id, message_type=message_type)


def wait_for_partitions(grid: Grid, num_nodes: int, timeout: float,
                        message_type: str = "query.info", run_config: RunConfig | None = None,
                        poll: float = 0.2, report_every: float = 10.0) -> dict[int, int]:
    """Wait until ``num_nodes`` nodes with partition ids 0..num_nodes-1 are connected.

    Asks every node (a ``message_type`` message marked ``INFO_KEY``, with ``run_config`` as
    ``RUN_KEY`` so a node can check that it can load its data) for its partition id and
    num-partitions until it answers; logs how many are there every ``report_every`` seconds.
    Returns {partition id: node id}. Raises RuntimeError on a mismatch with the federation, on
    a node that cannot start (e.g. its data are missing), on two nodes claiming one partition,
    or when the nodes are not all there within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + report_every
    partitions: dict[int, int] = {}
    while True:
        unknown = [nid for nid in grid.get_node_ids() if nid not in partitions.values()]
        if unknown:
            queries = [partition_query(nid, message_type, run_config) for nid in unknown]
            remaining = max(deadline - time.monotonic(), poll)
            _, replies = send_and_receive(grid, queries, remaining, label="partition query")
            for reply in replies:
                if reply.has_error():
                    raise RuntimeError(f"node {reply.metadata.src_node_id} did not say its "
                                       f"partition: {reply.error.reason}")
                pid = partition_answer(reply, num_nodes)
                if pid in partitions:
                    raise RuntimeError(
                        f"partition id {pid} is claimed by nodes {partitions[pid]} and "
                        f"{reply.metadata.src_node_id}; give every SuperNode its own "
                        f"partition-id")
                partitions[pid] = reply.metadata.src_node_id
        if sorted(partitions) == list(range(num_nodes)):
            return partitions
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(partitions)} of num-nodes={num_nodes} nodes (partitions "
                f"{sorted(partitions)}) connected within node-wait-timeout={timeout}s; start "
                f"more SuperNodes (simulation: --federation-config 'num-supernodes={num_nodes}')"
            )
        if time.monotonic() >= next_report:
            log.info("waiting for nodes: %s of num-nodes=%s connected (up to %.0fs more)",
                     len(partitions), num_nodes, deadline - time.monotonic())
            next_report += report_every
        time.sleep(poll)


def federation_size(grid: Grid, timeout: float, message_type: str = "query.info",
                    poll: float = 0.5) -> int:
    """num-partitions as the federation's nodes report it (the first node that answers)."""
    deadline = time.monotonic() + timeout
    while True:
        queries = [partition_query(nid, message_type, None) for nid in grid.get_node_ids()]
        if queries:
            _, replies = send_and_receive(grid, queries, max(deadline - time.monotonic(), poll),
                                          label="partition query")
            for reply in replies:
                info = reply.content.config_records.get("info")
                if not reply.has_error() and info is not None and "num-partitions" in info:
                    return record_int(info, "num-partitions")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no node reported num-partitions within node-wait-timeout="
                               f"{timeout}s: start the SuperNodes, or pass num_nodes")
        time.sleep(poll)


def partition_answer(reply: Message, num_nodes: int) -> int:
    """The partition id in a node's answer to ``partition_query``; RuntimeError if the node
    belongs to another federation or cannot load its data."""
    try:
        info = reply.content.config_records["info"]
        pid, total = record_int(info, "partition-id"), record_int(info, "num-partitions")
    except (KeyError, TypeError, ValueError) as err:
        raise RuntimeError(f"node {reply.metadata.src_node_id} answered the partition query "
                           f"without a partition-id and num-partitions ({err!r})") from None
    if total != num_nodes:
        raise RuntimeError(
            f"the federation has num-partitions={total} but the run config has "
            f"num-nodes={num_nodes}: pass --run-config 'num-nodes={total}' or start "
            f"{num_nodes} SuperNodes (simulation: --federation-config "
            f"'num-supernodes={num_nodes}')"
        )
    if "error" in info:
        raise RuntimeError(f"partition {pid} (node {reply.metadata.src_node_id}) cannot start: "
                           f"{str(info['error'])}")
    return pid


def run_in_process(strategy: DecentralizedStrategy, *,
                   make_rule: Callable[[RunConfig, int], NodeRule] | None = None,
                   initial_model: StateDict | None = None) -> list[dict]:
    """Drive ``strategy``'s plan and the node rules for all rounds in this process.

    ``make_rule`` defaults to the algorithm's registered node rule, ``initial_model`` to
    ``strategies.learner.initial_model`` of the config.

    Same plan, node rules and metrics as a Flower run (models are passed by reference instead
    of messages), so the same seed and config give the same metrics.jsonl rows. With
    ``state-dir`` the nodes checkpoint their state as in a Flower run, so that ``resume=true``
    continues an interrupted run with the same metrics.
    """
    config = strategy.config
    make_rule = make_rule or algorithm_spec(config.algorithm).make_rule
    if initial_model is None:
        initial_model = learner.initial_model(config)
    rules = {pid: make_rule(config, pid) for pid in range(config.num_nodes)}
    strategy.summary()
    resumed = strategy.open_run(initial_model if strategy.routing.routes_initial_model else None,
                                lambda tensors: tensors)
    checkpoints = {pid: node_checkpoints({}, config.state_dir, strategy.run_key, pid)
                   for pid in rules}
    states: dict[int, NodeState] = {}

    def round_trip(round_: int, stage: int) -> dict[int, dict]:
        metrics = {}
        for pid, task in strategy.plan(round_, stage).items():
            rule = rules[pid]
            state = starting_state(task, states.get(pid), checkpoints[pid],
                                   strategy.latest.get(pid) if resumed else None,
                                   rule.init_state, rule.restore, pid)
            states[pid], metrics[pid] = rule.step(
                state, task, {j: strategy.latest[j] for j in task.neighbours})
            saver = checkpoints[pid]
            if saver is not None:
                saver.save(states[pid], stage)
        strategy.latest.update((pid, state.shared) for pid, state in states.items())
        strategy.received.update(dict.fromkeys(states, round_))
        return metrics

    return strategy.run_rounds(round_trip)
