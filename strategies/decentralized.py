"""The serverless round loop shared by every decentralized algorithm.

The orchestrator (``DecentralizedStrategy``) only routes: each round it samples the graph G(t),
tells every node its neighbours and mixing weights, and forwards the neighbours' latest models
untouched. It never does arithmetic on parameters. Nodes hold their own state and run the
algorithm's ``NodeRule``. ``run_in_process`` drives the same plan and node rules without Flower.

Round protocol (one Flower round-trip per round): in round-trip t a node merges the models its
neighbours trained in round-trip t-1, evaluates the merged model, trains it locally and replies.
The merge completes round t-1 of the paper's adapt-then-combine loop, so the metrics of
round-trip t describe the model after round t-1 (round 0: the initial model). T rounds take
T + 1 round-trips; the last one merges and evaluates without training. An algorithm that needs
several exchanges per round (Mudag) splits round t into stages 0..K-1, one round-trip each;
stage 0 evaluates, and the metrics rows count the exchanges (``exchanges``) next to the rounds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Protocol

import networkx as nx
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.data import Dataset, Split, dirichlet_partition, load_dataset
from flwr_hyperprism.graphs import (
    TimeVaryingGraph,
    metropolis_hastings_weights,
    round_rng,
)
from flwr_hyperprism.metrics import RunRecorder, format_round, summarise_round

log = logging.getLogger("flwr")

NEIGHBOUR_PREFIX = "nbr."  # message records "nbr.<partition id>" carry neighbours' models
TASK_KEY = "hyperprism.task"  # the NodeTask record of a train message
RUN_KEY = "hyperprism.run"  # the run config record of a train message
INFO_KEY = "hyperprism.info"  # marks a request for the node's partition id
STAGE_KEY = "stage"  # train-config key of configure_train: the round-trip's stage in its round
StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class NodeTask:
    """What the orchestrator tells one node for one round (all ids are partition ids)."""

    round: int  # round-trip index t >= 1; its merge completes round t - 1
    neighbours: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()  # a_ij, aligned with neighbours
    self_weight: float = 1.0  # a_ii
    train: bool = True  # False in the final round-trip: merge and evaluate only
    coefficients: Mapping[str, float] = field(default_factory=dict)  # algorithm constants
    stage: int = 0  # round-trip within the round (0: the evaluating one; see ``stages``)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"round": self.round, "neighbours": list(self.neighbours),
                             "weights": list(self.weights), "self-weight": self.self_weight,
                             "train": self.train, "stage": self.stage,
                             **{f"coef.{k}": v for k, v in self.coefficients.items()}})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> NodeTask:
        coefficients = {k[len("coef."):]: float(v) for k, v in record.items()
                        if k.startswith("coef.")}
        return cls(int(record["round"]), tuple(int(n) for n in record["neighbours"]),
                   tuple(float(w) for w in record["weights"]), float(record["self-weight"]),
                   bool(record["train"]), coefficients, int(record["stage"]))

    def without(self, dropped: Iterable[int]) -> NodeTask:
        """This task with some neighbours left out; their weight goes to the node itself, so
        the row sum (1 for averaging weights, 0 for a Laplacian) is unchanged."""
        gone = set(dropped)
        keep = [(j, w) for j, w in zip(self.neighbours, self.weights) if j not in gone]
        self_weight = self.self_weight + sum(w for j, w in zip(self.neighbours, self.weights)
                                             if j in gone)
        return dataclasses.replace(self, neighbours=tuple(j for j, _ in keep),
                                   weights=tuple(w for _, w in keep), self_weight=self_weight)


@dataclass
class NodeState:
    """A node's persistent state: named groups of tensors.

    The ``shared`` group is what the node sends its neighbours each round: its model for the
    gossip algorithms, other vectors for algorithms such as ADOM+.
    """

    round: int = 0
    tensors: dict[str, StateDict] = field(default_factory=dict)

    @property
    def shared(self) -> StateDict:
        return self.tensors["shared"]


class NodeRule(Protocol):
    """An algorithm's node update; pure torch, no Flower."""

    def init_state(self) -> NodeState: ...

    def step(self, state: NodeState, task: NodeTask,
             neighbour_models: Mapping[int, StateDict]) -> tuple[NodeState, dict[str, float]]:
        """One round-trip: the new state and scalar metrics of the merged model."""
        ...


def screen_neighbours(own: StateDict, task: NodeTask, neighbour_models: Mapping[int, StateDict],
                      max_ratio: float) -> tuple[NodeTask, dict[int, str]]:
    """Drop neighbours whose model cannot be merged with ``own``, with the reason for each.

    A neighbour is dropped when its model is missing, lacks a tensor of ``own`` or has extra
    ones, has a tensor with another shape or dtype, or any NaN/Inf (``model_fault``), or when
    its largest floating-point magnitude exceeds ``max_ratio`` times a reference scale: the
    larger of the node's own largest magnitude and the lower median of the largest magnitudes
    of the node and its well-formed neighbours. The median keeps the check meaningful when the
    node's own model is all zeros (the start of logistic regression) or smaller than its
    neighbours', and a minority of outliers cannot move it. Each dropped neighbour's weight goes
    to the node itself (``NodeTask.without``). Returns the task to use and {partition: reason}.
    """
    faults = {j: model_fault(own, neighbour_models.get(j)) for j in task.neighbours}
    sizes = {j: largest_magnitude(neighbour_models[j]) for j, fault in faults.items()
             if fault is None}
    own_size = largest_magnitude(own)
    everyone = sorted([own_size, *sizes.values()])
    limit = max_ratio * max(own_size, everyone[(len(everyone) - 1) // 2])
    faults.update({j: f"|value| {size:.4g} > {limit:.4g}" for j, size in sizes.items()
                   if size > limit})
    dropped = {j: reason for j, reason in faults.items() if reason}
    return (task.without(dropped) if dropped else task), dropped


def model_fault(own: StateDict, model: StateDict | None) -> str | None:
    """Why ``model`` cannot be merged with ``own`` at all (None if it can)."""
    if model is None:
        return "no model"
    if model.keys() != own.keys():
        missing, extra = sorted(own.keys() - model.keys()), sorted(model.keys() - own.keys())
        return f"tensors differ (missing {missing}, extra {extra})"
    for key, mine in own.items():
        theirs = model[key]
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            return (f"{key!r} is {theirs.dtype} {tuple(theirs.shape)}, expected {mine.dtype} "
                    f"{tuple(mine.shape)}")
        if not bool(torch.isfinite(theirs).all()):
            return f"{key!r} has NaN or Inf"
    return None


def largest_magnitude(model: StateDict) -> float:
    """max |value| over the floating-point tensors of ``model`` (0 if it has none)."""
    return max((float(v.abs().max()) for v in model.values()
                if v.is_floating_point() and v.numel()), default=0.0)


@dataclass(frozen=True)
class NodeData:
    train: Split  # this node's partition
    test: Split  # the global test set

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


@lru_cache(maxsize=2)
def _partitioned(dataset: str, data_dir: str, download: bool, seed: int, num_nodes: int,
                 alpha: float, min_size: int) -> tuple[Dataset, tuple]:
    data = load_dataset(dataset, data_dir, download, seed)
    parts = dirichlet_partition(data.train.y.numpy(), num_nodes, alpha, seed, min_size)
    return data, tuple(parts)


def node_data(config: RunConfig, partition_id: int) -> NodeData:
    """The node's training partition and the global test set (cached per process).

    With ``eval_size`` > 0 the test set is a fixed random subset of that size (the same for
    every node and round), which makes per-round evaluation of CNNs affordable on CPUs.
    """
    if not 0 <= partition_id < config.num_nodes:
        raise ValueError(f"partition id {partition_id} is outside 0..{config.num_nodes - 1} "
                         f"(num-nodes={config.num_nodes})")
    data, parts = _partitioned(config.dataset, config.data_dir, config.download, config.seed,
                               config.num_nodes, config.alpha, config.min_partition_size)
    idx = torch.from_numpy(parts[partition_id])
    test = data.test
    if 0 < config.eval_size < len(test):
        keep = torch.from_numpy(round_rng(config.seed, 0xE7A1).permutation(len(test))
                                [:config.eval_size])
        test = Split(test.x[keep], test.y[keep])
    return NodeData(Split(data.train.x[idx], data.train.y[idx]), test)


class DecentralizedStrategy(Strategy):
    """Routing-only orchestrator: Flower round-trips, no global model.

    Round t: sample G(t); send node i its ``NodeTask`` and the latest model of each neighbour
    (as received, untouched); collect every node's new model and metrics; repeat for each of
    the round's ``stages``. Metrics are logged per round and, with ``run_dir``, written to
    metrics.jsonl / summary.json there.
    """

    algorithm: ClassVar[str]
    description: ClassVar[str]  # the algorithm's name in outputs
    # Round 1 routes the common initial model as every node's latest model (what the gossip
    # algorithms share); algorithms that share other vectors start with nothing to route.
    routes_initial_model: ClassVar[bool] = True
    info_message_type: ClassVar[str] = "query.info"  # the partition-id request (query.info)

    @property
    def train_message_type(self) -> str:
        """Train messages go to the ClientApp's ``train.<algorithm>`` handler."""
        return f"train.{self.algorithm}"

    def __init__(self, config: RunConfig, run_dir: str | Path | None = None) -> None:
        self.config = config
        self.graphs = TimeVaryingGraph(config.num_nodes, config.topology, config.density,
                                       config.seed, config.exact_edges, config.mobility_speed)
        self.run_dir = run_dir
        self.recorder: RunRecorder | None = None  # made when the run starts (``run_rounds``)
        self.node_ids: dict[int, int] = {}  # partition id -> Flower node id
        self.latest: dict[int, ArrayRecord] = {}  # partition id -> latest routed model
        self.node_metrics: dict[int, dict] = {}  # of the last aggregated round-trip

    # --- the plan: pure, shared with run_in_process -----------------------------------------

    def mixing_matrix(self, graph: nx.Graph) -> np.ndarray:
        """The (m, m) weights nodes combine with: Metropolis-Hastings by default."""
        return metropolis_hastings_weights(graph)

    def coefficients(self, round_: int) -> dict[str, float]:
        """Algorithm constants sent with every task (none by default)."""
        return {}

    def stages(self, round_: int) -> int:
        """Round-trips (exchanges) in round ``round_``: one, unless an algorithm needs more."""
        return 1

    def schedule(self) -> Iterator[tuple[int, int]]:
        """(round, stage) of every round-trip of the run, in order; rounds 1..num_rounds + 1."""
        for round_ in range(1, self.config.num_rounds + 2):
            for stage in range(self.stages(round_)):
                yield round_, stage

    def plan_round(self, round_: int, available: Iterable[int], stage: int = 0
                   ) -> dict[int, NodeTask]:
        """Each node's task for round-trip ``round_``: its row of ``mixing_matrix(G(t))``.

        Neighbours without a model to route (``available``) are left out and their weight
        goes to the node itself, so every row keeps its sum. The round-trip after the last
        round (``num_rounds + 1``) does not train. ``stage`` is 0 here (one stage per round).
        """
        weights = self.mixing_matrix(self.graphs.at(round_))
        have = set(available)
        train = round_ <= self.config.num_rounds
        coefficients = self.coefficients(round_)
        tasks = {}
        for i in range(self.config.num_nodes):
            nbrs = tuple(int(j) for j in weights[i].nonzero()[0] if j != i)
            task = NodeTask(round_, nbrs, tuple(float(weights[i, j]) for j in nbrs),
                            float(weights[i, i]), train, coefficients, stage)
            tasks[i] = task.without(j for j in nbrs if j not in have)
        return tasks

    # --- Flower hooks ------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Per-node messages: task, run config, and the neighbours' latest models.

        ``config[STAGE_KEY]`` (default 0) selects the stage of round ``server_round``; the rest
        of ``config`` is passed on as the message's "config" record.
        """
        run = ConfigRecord(self.config.to_run_config())
        stage = int(config.get(STAGE_KEY, 0))
        passed_on = ConfigRecord({k: v for k, v in config.items() if k != STAGE_KEY})
        messages = []
        for pid, task in self.plan_round(server_round, self.latest, stage).items():
            content = RecordDict({TASK_KEY: task.to_record(), RUN_KEY: run, "config": passed_on})
            for j in task.neighbours:
                content[f"{NEIGHBOUR_PREFIX}{j}"] = self.latest[j]
            messages.append(Message(content, dst_node_id=self.node_ids[pid],
                                    message_type=self.train_message_type,
                                    group_id=f"{server_round}.{stage}"))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store each node's new model for routing and its metrics (``node_metrics``).

        A node that failed (error reply) or did not reply in time is logged; its last model
        stays routed and it gets its next task as usual. No global model: returns None arrays
        and the metrics summarised over the nodes that replied.
        """
        partition_of = {nid: pid for pid, nid in self.node_ids.items()}
        node_metrics = {}
        failed = []
        for reply in replies:
            pid = partition_of[reply.metadata.src_node_id]
            if reply.has_error():
                log.error("round %s: node %s (partition %s) failed: %s", server_round,
                          reply.metadata.src_node_id, pid, reply.error.reason)
                failed.append(pid)
                continue
            self.latest[pid] = reply.content["arrays"]
            node_metrics[pid] = dict(reply.content["metrics"])
        silent = sorted(set(self.node_ids) - set(node_metrics) - set(failed))
        if silent:
            log.error("round %s: no reply within round-timeout=%ss from partitions %s",
                      server_round, self.config.round_timeout, silent)
        if failed or silent:
            log.warning("round %s: %s of %s nodes replied; the others keep their last routed "
                        "model", server_round, len(node_metrics), len(self.node_ids))
        self.node_metrics = node_metrics
        return None, MetricRecord(summarise_round(server_round - 1, node_metrics))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No evaluation round-trip: nodes evaluate inside the training reply.

        (``start`` sends what this returns after each round's stage-0 train round-trip and
        hands the replies to ``aggregate_evaluate``.)
        """
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Nothing to aggregate (see ``configure_evaluate``)."""
        return None

    def summary(self) -> None:
        log.info("%s: %s nodes, %s graph (density %s), %s rounds, dataset %s, model %s",
                 self.description, self.config.num_nodes, self.config.topology,
                 self.config.density, self.config.num_rounds, self.config.dataset,
                 self.config.model)

    # --- the round loop ----------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None,
              num_rounds: int | None = None, timeout: float | None = None,
              train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              ) -> Result:
        """Run the decentralized rounds; same signature as ``Strategy.start``.

        ``initial_arrays`` (the common initial model) is routed as every node's latest model
        in round 1. ``evaluate_fn``/``evaluate_config`` do not apply: there is no global model.
        ``result.train_metrics_clientapp[r]`` holds round r's aggregates, r = 0..num_rounds.
        """
        if num_rounds is not None and num_rounds != self.config.num_rounds:
            self.config = self.config.replace(num_rounds=num_rounds)
        if timeout is not None and timeout != self.config.round_timeout:
            self.config = self.config.replace(round_timeout=timeout)
        num_rounds, timeout = self.config.num_rounds, self.config.round_timeout
        self.summary()
        self.node_ids = wait_for_partitions(grid, self.config.num_nodes,
                                            self.config.node_wait_timeout, self.info_message_type,
                                            self.config)
        if initial_arrays and self.routes_initial_model:
            self.latest = dict.fromkeys(range(self.config.num_nodes), initial_arrays)
        result = Result()

        arrays = initial_arrays or ArrayRecord()

        def round_trip(round_: int, stage: int) -> dict[int, dict]:
            config = ConfigRecord({**(train_config or {}), STAGE_KEY: stage})
            messages = self.configure_train(round_, arrays, config, grid)
            self.aggregate_train(round_, send_and_receive(grid, messages, timeout))
            if stage == 0:
                evaluation = list(self.configure_evaluate(round_, arrays,
                                                          evaluate_config or ConfigRecord(), grid))
                if evaluation:
                    self.aggregate_evaluate(round_, send_and_receive(grid, evaluation, timeout))
            return self.node_metrics

        for row in self.run_rounds(round_trip):
            result.train_metrics_clientapp[row["round"]] = MetricRecord(row)
        return result

    def run_rounds(self, round_trip: Callable[[int, int], Mapping[int, Mapping[str, float]]]
                   ) -> list[dict]:
        """The round loop shared by Flower and in-process runs; returns the metrics rows.

        ``round_trip(round, stage)`` does one exchange and returns each replying node's
        metrics. Stage 0 of round t evaluates the model after round t - 1: its metrics make
        that round's row, with ``exchanges`` (round-trips whose vectors reached that model),
        ``seconds`` (wall time since the previous row) and ``neighbours_dropped`` counted over
        every exchange since the previous row.
        """
        self.recorder = (RunRecorder(self.run_dir, self.config, self.description)
                         if self.run_dir is not None else None)
        rows = []
        started = time.perf_counter()
        dropped: dict[int, float] = {}  # neighbours dropped in stages > 0, per node
        for exchanges, (round_, stage) in enumerate(self.schedule()):
            node_metrics = round_trip(round_, stage)
            for pid, metrics in node_metrics.items():
                dropped[pid] = dropped.get(pid, 0.0) + metrics.get("neighbours_dropped", 0.0)
            if stage == 0:
                node_metrics = {pid: {**metrics, "neighbours_dropped": dropped.pop(pid)}
                                for pid, metrics in node_metrics.items()}
                rows.append({**summarise_round(round_ - 1, node_metrics), "exchanges": exchanges,
                             "seconds": time.perf_counter() - started})
                self.record_round(rows[-1])
                started = time.perf_counter()
                dropped.clear()
        return rows

    def record_round(self, row: dict) -> None:
        """Log one metrics row and append it, naming the algorithm, to the run's files."""
        log.info("[%s] %s", self.algorithm, format_round(row, self.config.num_rounds))
        if self.recorder is not None:
            self.recorder.record({"algorithm": self.algorithm, **row})


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float,
                     max_poll: float = 0.1) -> list[Message]:
    """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds pass.

    Like ``Grid.send_and_receive``, but polls every 5 ms growing to ``max_poll`` seconds: the
    deployed Grid sleeps 3 s between pulls, longer than a whole round of a small model.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    poll = 0.005
    while pending:
        received = list(grid.pull_messages(pending))
        replies.extend(received)
        pending.difference_update(m.metadata.reply_to_message_id for m in received)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
        poll = min(2 * poll, max_poll)
    return replies


def wait_for_partitions(grid: Grid, num_nodes: int, timeout: float,
                        message_type: str = "query.info", run_config: RunConfig | None = None,
                        poll: float = 0.2, report_every: float = 10.0) -> dict[int, int]:
    """Wait until ``num_nodes`` nodes with partition ids 0..num_nodes-1 are connected.

    Asks every node (a ``message_type`` message marked ``INFO_KEY``, with ``run_config`` as
    ``RUN_KEY`` so a node can check that it can load its data) for its partition id and
    num-partitions until it answers; logs how many are there every ``report_every`` seconds.
    Returns {partition id: node id}. Raises RuntimeError on a mismatch with the federation, on
    a node that cannot start (e.g. its data are missing), or when the nodes are not all there
    within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + report_every
    partitions: dict[int, int] = {}
    content = {INFO_KEY: ConfigRecord()}
    if run_config is not None:
        content[RUN_KEY] = ConfigRecord(run_config.to_run_config())
    while True:
        unknown = [nid for nid in grid.get_node_ids() if nid not in partitions.values()]
        if unknown:
            queries = [Message(RecordDict(content), dst_node_id=nid, message_type=message_type)
                       for nid in unknown]
            remaining = max(deadline - time.monotonic(), poll)
            for reply in send_and_receive(grid, queries, remaining):
                _register_partition(reply, partitions, num_nodes)
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


def _register_partition(reply: Message, partitions: dict[int, int], num_nodes: int) -> None:
    if reply.has_error():
        raise RuntimeError(f"node {reply.metadata.src_node_id} did not say its partition: "
                           f"{reply.error.reason}")
    info = reply.content["info"]
    pid, total = int(info["partition-id"]), int(info["num-partitions"])
    if total != num_nodes:
        raise RuntimeError(
            f"the federation has num-partitions={total} but the run config has "
            f"num-nodes={num_nodes}: pass --run-config 'num-nodes={total}' or start "
            f"{num_nodes} SuperNodes (simulation: --federation-config "
            f"'num-supernodes={num_nodes}')"
        )
    if "error" in info:
        raise RuntimeError(f"partition {pid} (node {reply.metadata.src_node_id}) cannot start: "
                           f"{info['error']}")
    if pid in partitions:
        raise RuntimeError(f"partition id {pid} is claimed by nodes {partitions[pid]} and "
                           f"{reply.metadata.src_node_id}; give every SuperNode its own "
                           f"partition-id")
    partitions[pid] = reply.metadata.src_node_id


def run_in_process(strategy: DecentralizedStrategy,
                   make_rule: Callable[[RunConfig, int], NodeRule],
                   initial_model: StateDict) -> list[dict]:
    """Drive ``strategy``'s plan and the node rules for all rounds in this process.

    Same plan, node rules and metrics as a Flower run (models are passed by reference instead
    of messages), so the same seed and config give the same metrics.jsonl rows.
    """
    config = strategy.config
    rules = {pid: make_rule(config, pid) for pid in range(config.num_nodes)}
    states = {pid: rule.init_state() for pid, rule in rules.items()}
    latest = dict.fromkeys(rules, initial_model) if strategy.routes_initial_model else {}
    strategy.summary()

    def round_trip(round_: int, stage: int) -> dict[int, dict]:
        metrics = {}
        for pid, task in strategy.plan_round(round_, latest, stage).items():
            states[pid], metrics[pid] = rules[pid].step(
                states[pid], task, {j: latest[j] for j in task.neighbours})
        latest.update((pid, state.shared) for pid, state in states.items())
        return metrics

    return strategy.run_rounds(round_trip)
