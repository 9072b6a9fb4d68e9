"""ADOM+ (Kovalev et al., NeurIPS 2021), the primal variant of ADOM, on time-varying graphs.

ADOM (ICML 2021) needs gradients of the Fenchel conjugates of the local losses, which neural
networks do not have; this module implements ADOM+, which uses primal gradients only, and every
output names it "ADOM+ (primal ADOM)".

Orchestrator: the gossip matrix W(t) = Lap(t) / lambda_max(Lap(t)) of the round's graph (rows sum
to 0; a round without links has W = 0), and chi = max_t 1 / lambda_min+(W(t)) over the run's
graphs, sent with every task. Constants from L = ``smoothness`` and mu = ``strong-convexity``
(kappa = L / mu = 10 as in the HyperPrism paper; L = 100 = 1 / lr by default).

Node: state x, x_f, y, y_f, z, z_f, m (model-sized). It shares q = (gamma/nu)(y_g + z_g) + m
and y_g + z_g, computed from its state, so the products with W need one exchange per round:
round-trip t uses its neighbours' vectors to apply W, evaluates x_f (the model after round
t - 1), takes one stochastic gradient at x_g, updates, and replies the vectors of round t + 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np
import torch

from flwr_hyperprism.math.graphs import gossip_matrix
from flwr_hyperprism.setup.config import RunConfig

from .base.accelerated import AcceleratedSettings
from .base.learner import clone_tensors
from .base.node import Gradient, GradientNode, mix_row
from .base.plan import RoutingPlan
from .base.rule import NodeState, NodeTask, StateDict
from .base.spec import AlgorithmSpec

ADOM_VECTORS = ("x", "x_f", "y", "y_f", "z", "z_f", "m")


class ADOM(RoutingPlan):
    """ADOM+'s routing plan: gossip-matrix rows and chi."""

    algorithm = "adom"
    description = "ADOM+ (primal ADOM)"
    routes_initial_model = False  # nodes share q and y_g + z_g, zero at the start

    def mixing_matrix(self, graph: nx.Graph) -> np.ndarray:
        return gossip_matrix(graph)

    def coefficients(self, round_: int) -> dict[str, float]:
        return {"chi": self.chi}

    @cached_property
    def chi(self) -> float:
        """max over the run's graphs of 1 / (smallest positive eigenvalue of W(t)); 1 if none."""
        inverse_gaps = []
        for round_ in range(1, self.config.num_rounds + 2):
            eigenvalues = np.linalg.eigvalsh(gossip_matrix(self.graphs.at(round_)))
            positive = eigenvalues[eigenvalues > 1e-9]
            if len(positive):
                inverse_gaps.append(1.0 / positive[0])
        return max(inverse_gaps, default=1.0)


@dataclass(frozen=True)
class ADOMConstants:
    """ADOM+'s step sizes and momenta from L, mu and chi (Kovalev et al., 2021)."""

    L: float
    mu: float
    chi: float

    @property
    def tau2(self) -> float:
        return math.sqrt(self.mu / self.L)

    @property
    def tau1(self) -> float:
        return 1.0 / (1.0 / self.tau2 + 0.5)

    @property
    def eta(self) -> float:
        return 1.0 / (self.L * self.tau2)

    @property
    def nu(self) -> float:  # = alpha
        return self.mu / 2.0

    @property
    def beta(self) -> float:
        return 1.0 / (2.0 * self.L)

    @property
    def sigma2(self) -> float:
        return math.sqrt(self.mu / self.L) / (16.0 * self.chi)

    @property
    def sigma1(self) -> float:
        return 1.0 / (1.0 / self.sigma2 + 0.5)

    @property
    def gamma(self) -> float:
        return self.nu / (14.0 * self.sigma2 * self.chi**2)

    @property
    def delta(self) -> float:
        return 1.0 / (17.0 * self.L)

    @property
    def theta(self) -> float:
        return self.nu / (4.0 * self.sigma2)

    zeta = 0.5


class ADOMUpdate:
    """ADOM+'s node update on parameter dicts (a ``GradientMethod``): one gradient at x_g."""

    def __init__(self, config: RunConfig) -> None:
        self.settings = AcceleratedSettings.of(config)

    def init_state(self, x: StateDict) -> NodeState:
        tensors = {"x": clone_tensors(x), "x_f": clone_tensors(x)}
        tensors.update({name: {k: torch.zeros_like(v) for k, v in x.items()}  # no aliasing
                        for name in ("y", "y_f", "z", "z_f", "m")})
        tensors["shared"] = {f"{prefix}.{k}": torch.zeros_like(v)
                             for prefix in ("q", "yz") for k, v in x.items()}
        return NodeState(0, tensors)

    def round_trip(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
                   gradient: Gradient) -> tuple[NodeState, StateDict | None]:
        """Evaluates x_f (the model after round t - 1), then updates unless told not to train."""
        c = ADOMConstants(self.settings.smoothness, self.settings.strong_convexity,
                          task.coefficients["chi"])
        v = state.tensors
        if not task.train:
            return NodeState(task.round, dict(v)), v["x_f"]

        # W applied to the shared vectors: own row entry plus the neighbours'
        mixed = mix_row(task, state.shared, neighbours)
        new: dict[str, StateDict] = {name: {} for name in ADOM_VECTORS}
        x_g = {k: c.tau1 * v["x"][k] + (1 - c.tau1) * v["x_f"][k] for k in v["x"]}
        grad = gradient(x_g)
        for k in v["x"]:
            y_g = c.sigma1 * v["y"][k] + (1 - c.sigma1) * v["y_f"][k]
            z_g = c.sigma1 * v["z"][k] + (1 - c.sigma1) * v["z_f"][k]
            xi1 = v["x"][k] + c.eta * c.nu * x_g[k] - c.eta * (grad[k] - c.nu * x_g[k])
            xi2 = (v["y"][k] + c.theta * c.beta * (grad[k] - c.nu * x_g[k])
                   - c.theta / c.nu * (y_g + z_g))
            damp = 1 + c.eta * c.nu
            y_next = (xi2 - c.theta * xi1 / damp) / (1 + c.theta * c.beta + c.theta * c.eta / damp)
            x_next = (xi1 + c.eta * y_next) / damp
            q = state.shared[f"q.{k}"]  # (gamma / nu)(y_g + z_g) + m, as sent last round
            new["z"][k] = v["z"][k] + c.gamma * c.delta * (z_g - v["z"][k]) - mixed[f"q.{k}"]
            new["m"][k] = q - mixed[f"q.{k}"]
            new["x_f"][k] = x_g[k] + c.tau2 * (x_next - v["x"][k])
            new["y_f"][k] = y_g + c.sigma2 * (y_next - v["y"][k])
            new["z_f"][k] = z_g - c.zeta * mixed[f"yz.{k}"]
            new["x"][k], new["y"][k] = x_next, y_next
        new["shared"] = self.messages(new, c)
        return NodeState(task.round, new), v["x_f"]

    @staticmethod
    def messages(v: Mapping[str, StateDict], c: ADOMConstants) -> StateDict:
        """What the node shares for the next round: q and y_g + z_g."""
        shared = {}
        for k in v["x"]:
            yz = (c.sigma1 * v["y"][k] + (1 - c.sigma1) * v["y_f"][k]
                  + c.sigma1 * v["z"][k] + (1 - c.sigma1) * v["z_f"][k])
            shared[f"q.{k}"] = c.gamma / c.nu * yz + v["m"][k]
            shared[f"yz.{k}"] = yz
        return shared


class ADOMNode(GradientNode):
    """ADOM+ on the node's learner (its own model and data, or a train handler)."""

    method = ADOMUpdate
    model_groups = ("x_f", "x")


SPEC = AlgorithmSpec(ADOM, ADOMNode, AcceleratedSettings)
