"""SwarmSGD (Nadiradze et al., 2021): pairwise averaging over a random matching.

Orchestrator: each round it draws a random maximal matching of G(t) (edges in random order,
kept when both ends are free) and pairs the matched nodes; a node is told its partner with
weight 1/2. Node: H local SGD steps (``swarm-local-steps``, 1 as in the paper), then
w_i = w_j = (w_i + w_j) / 2 with its partner (adapt then combine: in round-trip t a pair averages
the models both trained in round-trip t - 1). A node left out of the matching keeps its model
and, with ``swarm-unmatched='sgd'`` (default), still trains; with ``'idle'`` it waits.
Synchronous, blocking, unquantised (the paper's asynchronous/quantised parts are not modelled).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr_hyperprism.math.graphs import random_maximal_matching
from flwr_hyperprism.math.seeding import round_rng
from flwr_hyperprism.setup.config import RunConfig
from flwr_hyperprism.setup.settings import AlgorithmSettings

from .base.learner import DataLearner, node_data
from .base.plan import RoutingPlan
from .base.rule import NodeTask
from .base.spec import AlgorithmSpec
from .dpsgd import DPSGDNode

UNMATCHED_STEPS = ("sgd", "idle")


@dataclass(frozen=True)
class SwarmSGDSettings(AlgorithmSettings):
    """SwarmSGD's local work per pairwise average."""

    native_only = ("swarm_local_steps",)  # in plug-in mode the app's handler trains

    swarm_local_steps: int = 1  # H, local SGD steps before each pairwise average (paper: 1)
    swarm_unmatched: str = "sgd"  # what a node left out of the round's matching does: 'idle'

    def validate(self) -> None:
        self.require_choices({"swarm_unmatched": UNMATCHED_STEPS})
        self.require_ranges([("swarm_local_steps", 1, None, "an integer >= 1")])


class SwarmSGD(RoutingPlan):
    """SwarmSGD's routing plan: a random matching per round."""

    algorithm = "swarmsgd"
    description = "SwarmSGD"

    def plan_round(self, round_: int, available: Iterable[int], stage: int = 0
                   ) -> dict[int, NodeTask]:
        """Matched pairs average with weight 1/2; nodes without a routable partner are left out.

        Only edges whose both ends have a model to route (``available``) can be matched.
        One stage per round (``stage`` is 0).
        """
        have = set(available)
        graph = self.graphs.at(round_).subgraph(have)
        train = round_ <= self.config.num_rounds
        unmatched_train = SwarmSGDSettings.of(self.config).swarm_unmatched == "sgd"
        tasks = {i: NodeTask(round_, train=train and unmatched_train)
                 for i in range(self.config.num_nodes)}
        for i, j in random_maximal_matching(graph, round_rng(self.config.seed, round_, 0x5A)):
            tasks[i] = NodeTask(round_, (j,), (0.5,), 0.5, train)
            tasks[j] = NodeTask(round_, (i,), (0.5,), 0.5, train)
        return tasks


class SwarmSGDNode(DPSGDNode):
    """D-PSGD's node with H local steps per round (weights 1/2 come from the plan)."""

    @classmethod
    def native_learner(cls, config: RunConfig, partition_id: int) -> DataLearner:
        return DataLearner(config, node_data(config, partition_id),
                           SwarmSGDSettings.of(config).swarm_local_steps)


SPEC = AlgorithmSpec(SwarmSGD, SwarmSGDNode, SwarmSGDSettings)
