"""Mudag (Ye et al., 2020, arXiv 2005.00797): accelerated gradient steps with FastMix consensus.

Node state: x, y, y_prev, g_prev (the gradient at y_prev) and the FastMix iterates (``shared``,
the one neighbours see, and ``previous``). Every round t:

    g = grad f_i(y)                         (one stochastic minibatch)
    u = y + (x - y_prev) - eta_M (g - g_prev)
    x_new = FastMix(U, K(t); Wm(t))         (K(t) exchanges with the neighbours)
    y_new = x_new + beta (x_new - x);  y_prev, g_prev, x, y <- y, g, x_new, y_new

FastMix: X_0 = X_-1 = U; X_k+1 = (1 + eta_w) Wm X_k - eta_w X_k-1, with Wm(t) = I - Lap/lambda_max
and eta_w, K(t) from its second largest eigenvalue lambda2 (``graphs.fastmix_momentum``,
``graphs.fastmix_steps``: K = ceil(c_K ln(kappa) / sqrt(1 - lambda2)), capped at
``mudag-max-gossip``; a disconnected graph has lambda2 = 1, clamped to 1 - 1e-3, so it gets
the cap and mixes within its components). eta_M = 1/L, beta = (1 - a)/(1 + a), a = sqrt(mu/L),
from L = ``smoothness``, mu = ``strong-convexity``.

Round-trips: round t has K(t) of them, one per exchange. Stage 0 of round t applies the last
FastMix step of round t - 1 (none in round 1), finishes that round, evaluates x (the model after
round t - 1) and computes u for round t; stages 1..K(t)-1 are FastMix steps 1..K(t)-1. So a run
of T rounds takes sum_t K(t) + 1 round-trips, and the metrics rows count ``exchanges``.

Consensus start: every node builds the same initial model from the run's seed, so x = y = y_prev
= u is the network mean at the start, as Mudag requires.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from flwr_hyperprism.math.graphs import fastmix_momentum, fastmix_steps, gossip_matrix
from flwr_hyperprism.setup.config import RunConfig

from .base.accelerated import AcceleratedSettings
from .base.learner import clone_tensors
from .base.node import Gradient, GradientNode, mix_row
from .base.plan import RoutingPlan
from .base.rule import NodeState, NodeTask, StateDict
from .base.spec import AlgorithmSpec


@dataclass(frozen=True)
class MudagSettings(AcceleratedSettings):
    """L, mu and the number of FastMix gossip steps per round."""

    # K = ceil(factor * ln(kappa) / sqrt(1 - lambda2)) FastMix gossip steps, at most the cap
    mudag_gossip_factor: float = 1.0  # c_K
    mudag_max_gossip: int = 20

    def validate(self) -> None:
        super().validate()
        self.require_positive(("mudag_gossip_factor",))
        self.require_ranges([("mudag_max_gossip", 1, None, "an integer >= 1")])


class Mudag(RoutingPlan):
    """Mudag's routing plan: K(t) FastMix stages per round over Wm(t) = I - Wg(t)."""

    algorithm = "mudag"
    description = "Mudag"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.settings = MudagSettings.of(config)
        self._lambda2: dict[int, float] = {}  # round -> lambda2(Wm(t)), computed once

    def mixing_matrix(self, graph: nx.Graph) -> np.ndarray:
        matrix: np.ndarray = np.eye(graph.number_of_nodes()) - gossip_matrix(graph)
        return matrix

    def lambda2(self, round_: int) -> float:
        """Second largest eigenvalue of Wm(t) (1 when G(t) is disconnected)."""
        if round_ not in self._lambda2:
            eigenvalues = np.linalg.eigvalsh(self.mixing_matrix(self.graphs.at(round_)))
            self._lambda2[round_] = float(eigenvalues[-2])
        return self._lambda2[round_]

    def gossip_steps(self, round_: int) -> int:
        """K(t), the FastMix exchanges of round ``round_``."""
        settings = self.settings
        return fastmix_steps(self.lambda2(round_),
                             settings.smoothness / settings.strong_convexity,
                             settings.mudag_gossip_factor, settings.mudag_max_gossip)

    def stages(self, round_: int) -> int:
        return self.gossip_steps(round_) if round_ <= self.config.num_rounds else 1

    def coefficients(self, round_: int) -> dict[str, float]:
        return {"eta_w": fastmix_momentum(self.lambda2(round_))}

    def plan_round(self, round_: int, available: Iterable[int], stage: int = 0
                   ) -> dict[int, NodeTask]:
        """Rows of Wm and eta_w of the round being mixed: t - 1 at stage 0, else t."""
        mixing_round = round_ - 1 if stage == 0 else round_
        if mixing_round == 0:  # round 1 starts with nothing to mix
            tasks = {i: NodeTask(round_, coefficients={"eta_w": 0.0})
                     for i in range(self.config.num_nodes)}
        else:
            tasks = super().plan_round(mixing_round, available)
        train = round_ <= self.config.num_rounds
        return {i: dataclasses.replace(task, round=round_, stage=stage, train=train)
                for i, task in tasks.items()}


@dataclass(frozen=True)
class MudagConstants:
    """Mudag's step size and momentum from L and mu."""

    L: float
    mu: float

    @property
    def eta(self) -> float:
        return 1.0 / self.L

    @property
    def beta(self) -> float:
        a = math.sqrt(self.mu / self.L)
        return (1.0 - a) / (1.0 + a)


class MudagUpdate:
    """Mudag's node update on parameter dicts (a ``GradientMethod``)."""

    def __init__(self, config: RunConfig) -> None:
        settings = MudagSettings.of(config)
        self.constants = MudagConstants(settings.smoothness, settings.strong_convexity)

    def init_state(self, x: StateDict) -> NodeState:
        tensors = {name: clone_tensors(x) for name in ("x", "y", "y_prev", "shared", "previous")}
        tensors["g_prev"] = {k: torch.zeros_like(v) for k, v in x.items()}
        return NodeState(0, tensors)

    def round_trip(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
                   gradient: Gradient) -> tuple[NodeState, StateDict | None]:
        """A FastMix step; at stage 0 also the gradient step. Evaluates x at stage 0."""
        v, eta_w = state.tensors, task.coefficients["eta_w"]
        mixed = {k: (1 + eta_w) * value - eta_w * v["previous"][k]
                 for k, value in mix_row(task, state.shared, neighbours).items()}
        if task.stage > 0:
            return NodeState(task.round, {**v, "shared": mixed, "previous": state.shared}), None

        c = self.constants
        new = {"x": mixed, "y_prev": v["y"], "g_prev": v["g_prev"],
               "y": {k: x + c.beta * (x - v["x"][k]) for k, x in mixed.items()}}
        u = new["x"]
        if task.train:
            g = gradient(new["y"])
            u = {k: y + new["x"][k] - new["y_prev"][k] - c.eta * (g[k] - new["g_prev"][k])
                 for k, y in new["y"].items()}
            new["g_prev"] = g
        new["shared"], new["previous"] = u, clone_tensors(u)
        return NodeState(task.round, new), new["x"]


class MudagNode(GradientNode):
    """Mudag on the node's learner (its own model and data, or a train handler)."""

    method = MudagUpdate
    model_groups = ("x", "y", "y_prev", "shared", "previous")

    @classmethod
    def conserved_degree(cls, config: RunConfig) -> float | None:
        return 1.0  # FastMix mixes with doubly stochastic weights


SPEC = AlgorithmSpec(Mudag, MudagNode, MudagSettings)
