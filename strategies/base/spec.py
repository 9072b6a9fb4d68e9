"""What makes an algorithm: its routing plan and its node rule, declared once in its module.

Each algorithm module ends with ``SPEC = AlgorithmSpec(Plan, NodeRule, Settings)``; the package
collects every module's ``SPEC`` into ``strategies.ALGORITHMS`` (``strategies/__init__.py``),
which the apps, plug-in mode, the sweeps and the test battery read. The plan (a
``RoutingPlan``) carries the algorithm's name and display name, the settings (an
``AlgorithmSettings`` dataclass) its own config keys; the orchestrator that carries a plan out
is the same for every algorithm (``flwr_hyperprism/orchestration``).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr_hyperprism.setup.config import RunConfig
from flwr_hyperprism.setup.settings import AlgorithmSettings

from .learner import Learner
from .node import GossipNode, LearningNode
from .plan import RoutingPlan


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm: the plan of its rounds, the rule its nodes follow and its own settings
    (``config.algorithm_settings``; the base class: none)."""

    plan: type[RoutingPlan]
    node_rule: type[LearningNode]
    settings: type[AlgorithmSettings] = AlgorithmSettings

    @property
    def name(self) -> str:
        """The ``algorithm`` config value."""
        return self.plan.algorithm

    @property
    def display_name(self) -> str:
        """The algorithm's name in logs and outputs."""
        return self.plan.description

    def check(self, config: RunConfig) -> None:
        """Raise ValueError for settings this algorithm cannot honour."""
        if config.local_patterns and not issubclass(self.node_rule, GossipNode):
            raise ValueError(f"local-layers={config.local_layers!r}: {self.display_name} mixes "
                             f"vectors other than the model, so no layer can stay out of a "
                             f"merge; local-layers is for the algorithms that merge models")

    def make_rule(self, config: RunConfig, partition_id: int,
                  learner: Learner | None = None) -> LearningNode:
        """The node rule of ``partition_id``, natively (its own model and data) or around
        ``learner`` (plug-in mode's train handler)."""
        if learner is None:
            return self.node_rule.for_partition(config, partition_id)
        return self.node_rule(config, partition_id, learner)
