"""The round loop shared by Flower and in-process runs: the plan's round-trips in order, one
metrics row per round, a checkpoint after every round-trip.

Round protocol (one round-trip per round): in round-trip t a node merges the models its
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from flwr_hyperprism.setup.config import RunConfig
from strategies import algorithm_spec
from strategies.base.plan import RoutingPlan
from strategies.base.rule import NodeTask, StateDict

from .metrics import Row, summarise_round
from .routing import RoutingTable, as_state_dict
from .store import RunStore

log = logging.getLogger("flwr")

NodeMetrics = dict[int, dict[str, float]]
RoundTrip = Callable[[int, int], tuple[NodeMetrics, Mapping[int, ArrayRecord]]]
"""``round_trip(round, stage)``: one exchange; each replying node's metrics and the models
the nodes reported ({partition: model}; empty when the exchange asked for none)."""
RoundCallback = Callable[[dict[str, Any], dict[int, ArrayRecord]], None]
"""``on_round(row, models)``: called after each metrics row is recorded, with the row and the
nodes' models of that round ({partition id: model}; empty in rounds that use none)."""


class RoundLoop:
    """An algorithm's rounds: its plan, the routing table, the run store, the loop.

    Parameters
    ----------
    plan : the algorithm's routing plan (who hears from whom, with which weights)
    run_dir : where the outputs and the checkpoint go (None: nowhere)
    on_round : called with every metrics row (``RoundCallback``)
    """

    def __init__(self, plan: RoutingPlan, run_dir: str | Path | None = None,
                 on_round: RoundCallback | None = None) -> None:
        self.plan = plan
        self.routing: RoutingTable[Any] = RoutingTable()
        self.store = RunStore(run_dir)
        self.on_round = on_round
        self._dropped: dict[int, float] = {}  # neighbours dropped in stages > 0, per node
        self._next_exchange = 0  # index in the plan's ``schedule()`` of the next round-trip

    @property
    def config(self) -> RunConfig:
        """The run's settings (its plan's)."""
        return self.plan.config

    def reconfigure(self, **changes: Any) -> None:
        """Change settings before the run opens (e.g. ``num_rounds`` given to ``start``); a
        change to None or to the current value is no change."""
        changes = {k: v for k, v in changes.items()
                   if v is not None and v != getattr(self.config, k)}
        if changes:
            self.plan = type(self.plan)(self.config.replace(**changes))

    def open(self, initial: Any, routed_form: Callable[[StateDict], Any],
             settings: Mapping[str, object] | None = None) -> bool:
        """Open the run; returns whether it resumes.

        Fresh: ``initial`` (if the plan routes one) becomes every partition's latest model.
        Resume: the checkpoint gives the latest tensors (``routed_form`` turns them into what
        the routing table holds), the round-trip to continue from and the rows to keep.
        ``settings``: what config.json says (default: the run's and its algorithm's settings).
        """
        checkpoint = self.store.open(self.config, self.plan.description,
                                     settings if settings is not None
                                     else self.config.to_run_config())
        if checkpoint is None:
            self.routing.start(initial if self.plan.routes_initial_model else None,
                               self.config.num_nodes)
            self._dropped, self._next_exchange = {}, 0
            return False
        self.routing.restore({pid: routed_form(t) for pid, t in checkpoint.latest.items()},
                             checkpoint.received)
        self._dropped, self._next_exchange = checkpoint.dropped, checkpoint.next_exchange
        return True

    def log_summary(self) -> None:
        """Log what the run is: algorithm, nodes, graph, rounds, data and model."""
        config = self.config
        log.info("%s: %s nodes, %s graph (density %s), %s rounds, dataset %s, model %s",
                 self.plan.description, config.num_nodes, config.topology, config.density,
                 config.num_rounds, config.dataset, config.model)

    def tasks(self, round_: int, stage: int) -> dict[int, NodeTask]:
        """Every routable node's task of round-trip (``round_``, ``stage``)."""
        return self.routing.tasks(self.plan, round_, stage)

    def run(self, round_trip: RoundTrip) -> list[Row]:
        """Every round-trip of the plan's schedule; returns the metrics rows.

        Stage 0 of round t evaluates the model after round t - 1: its metrics make that
        round's row, with ``exchanges`` (round-trips whose vectors reached that model),
        ``seconds`` (wall time since the previous row), ``neighbours_dropped`` counted over
        every exchange since the previous row, ``partitions_missing`` (no reply) and
        ``partitions_stale`` (not routed: too old). Round-trips before the checkpoint's (a
        resumed run) are skipped; the checkpoint is written after each one.
        """
        rows = self.store.rows
        started = time.perf_counter()
        everyone = set(range(self.config.num_nodes))
        for exchanges, (round_, stage) in enumerate(self.plan.schedule()):
            if exchanges < self._next_exchange:
                continue
            node_metrics, reported = round_trip(round_, stage)
            for pid, metrics in node_metrics.items():
                self._dropped[pid] = (self._dropped.get(pid, 0.0)
                                      + metrics.get("neighbours_dropped", 0.0))
            if stage == 0:
                node_metrics = {pid: {**metrics, "neighbours_dropped": self._dropped.pop(pid)}
                                for pid, metrics in node_metrics.items()}
                rows.append({**summarise_round(round_ - 1, node_metrics),
                             "partitions_missing": sorted(everyone - set(node_metrics)),
                             "partitions_stale": list(self.routing.stale),
                             "exchanges": exchanges, "seconds": time.perf_counter() - started})
                self.store.record(self.plan.algorithm, rows[-1], self.config.num_rounds)
                if self.on_round is not None:
                    self.on_round(rows[-1], dict(reported))
                started = time.perf_counter()
                self._dropped.clear()
            self._next_exchange = exchanges + 1
            self.store.save(self._next_exchange,
                            {pid: as_state_dict(m) for pid, m in self.routing.latest.items()},
                            self.routing.received, self._dropped, self.config)
        return rows


def round_loop(config: RunConfig, run_dir: str | Path | None = None,
               on_round: RoundCallback | None = None) -> RoundLoop:
    """The round loop of ``config.algorithm`` (its settings checked), outputs in ``run_dir``."""
    spec = algorithm_spec(config.algorithm)
    spec.check(config)
    return RoundLoop(spec.plan(config), run_dir, on_round)
