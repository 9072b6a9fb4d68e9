"""Local training: no communication, the lower bound every decentralized table should show.

Orchestrator: routes nothing; every node's task has no neighbours, every round. Node: its own
model, trained on its own partition with the same local SGD as the gossip algorithms and
evaluated on the global test set like them. Equal to D-PSGD on a graph without edges.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from .base.learner import clone_tensors
from .base.node import GossipNode, NoExtra
from .base.plan import RoutingPlan
from .base.rule import StateDict
from .base.spec import AlgorithmSpec


class Local(RoutingPlan):
    """A routing plan that only schedules: no node is told of a neighbour."""

    algorithm = "local"
    description = "Local (no communication)"

    def mixing_matrix(self, graph: nx.Graph) -> np.ndarray:
        """The identity: every node's row is its own model only, whatever G(t) is."""
        return np.eye(graph.number_of_nodes())


class LocalNode(GossipNode[NoExtra]):
    """Keeps its own model: the merge of one model is that model."""

    def combine(self, models: list[StateDict], weights: Tensor, gen: torch.Generator,
                metrics: dict[str, float], extra: NoExtra) -> tuple[StateDict, NoExtra]:
        return clone_tensors(models[0]), extra


SPEC = AlgorithmSpec(Local, LocalNode)
