"""The routing plan of an algorithm: who hears from whom, with which weights (no Flower).

Each algorithm's plan is a ``RoutingPlan``, built as ``Plan(config)``: every round-trip it
samples G(t) and gives each node its ``NodeTask`` (neighbours, mixing weights, constants). The
round loop (``flwr_hyperprism.orchestration.rounds``) carries out the same plan over Flower and
in-process; nothing here touches a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import ClassVar

import networkx as nx
import numpy as np

from flwr_hyperprism.math.graphs import TimeVaryingGraph, metropolis_hastings_weights
from flwr_hyperprism.setup.config import RunConfig

from .rule import NodeTask


class RoutingPlan:
    """An algorithm's orchestration: the tasks of every round-trip on a time-varying graph."""

    algorithm: ClassVar[str]  # the ``algorithm`` config value
    description: ClassVar[str]  # the algorithm's name in outputs
    # Round 1 routes the common initial model as every node's latest model (what the gossip
    # algorithms share); algorithms that share other vectors start with nothing to route.
    routes_initial_model: ClassVar[bool] = True

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.graphs = TimeVaryingGraph(config.num_nodes, config.topology, config.density,
                                       config.seed, config.exact_edges, config.mobility_speed)

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
