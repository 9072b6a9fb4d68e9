"""D-PSGD (Lian et al., 2017): linear gossip averaging with Metropolis-Hastings weights.

Orchestrator: the shared routing loop (MH weights on G(t), the same as HyperPrism's, so p = 1
comparisons are exact). Node: w_i <- sum_j a_ij w_j plus local SGD, in either order
(``order``): ``atc`` (default, = HyperPrism's Algorithm 1 with p = 1) trains then averages;
``cta`` (Lian et al.) adds the update computed at the pre-averaging model to the average.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flwr_hyperprism.math.merge import merge_models
from flwr_hyperprism.setup.config import RunConfig

from .base.node import LINEAR, GossipNode, NoExtra
from .base.plan import RoutingPlan
from .base.rule import StateDict
from .base.spec import AlgorithmSpec


class DPSGD(RoutingPlan):
    """D-PSGD's routing plan."""

    algorithm = "dpsgd"
    description = "D-PSGD"


class DPSGDNode(GossipNode[NoExtra]):
    """Weighted arithmetic mean of the node's and its neighbours' models."""

    @classmethod
    def conserved_degree(cls, config: RunConfig) -> float | None:
        return 1.0  # the network average

    def combine(self, models: list[StateDict], weights: Tensor, gen: torch.Generator,
                metrics: dict[str, float], extra: NoExtra) -> tuple[StateDict, NoExtra]:
        # The p = 1 power mean: the same arithmetic as HyperPrism with fixed p = 1.
        return merge_models(models, weights, LINEAR, self.groups), extra


SPEC = AlgorithmSpec(DPSGD, DPSGDNode)
