"""HyperPrism (NeurIPS 2024): orchestration and node update, side by side.

Orchestrator: the shared routing loop with Metropolis-Hastings weights on G(t) (nothing to add).
Node i, one round-trip (the paper's Algorithm 1, synchronous; see ``strategies.base.node`` for the
round-trip and the two orders):
  1. (p_theta, p_phi) = HN_i(v_i, gradient summary)      -- or fixed p (ablation; p = 1: D-PSGD)
  2. merge per layer group in mirror space: w_i <- WPM_p({w_j}_{j in N_i + i}; a_i.)
  3. train HN_i: loss of the merged model on a fresh minibatch, backpropagated through the merge
     into the hypernetwork and v_i (neighbours' models are constants)
  4. evaluate the merged model on the global test set (the paper's per-round accuracy)
  5. local training (SGD, one epoch by default) -> new gradient summary; reply with the model.
With ``order='cta'`` the local update is applied in mirror space instead (the paper's Eq. 6,
``mirror_grad``): w_i <- s_p^{-1}(sum_j a_ij s_p(w_j) + update_i), update_i computed at w_i.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from flwr_hyperprism.math.degrees import (
    degree_grid,
    descent_degree,
    scheduled_degree,
    tracked_degree_step,
)
from flwr_hyperprism.math.hypernetwork import SUMMARY_STATS, HyperNetwork, gradient_summary
from flwr_hyperprism.math.merge import merge_models, stack_group
from flwr_hyperprism.math.mirror import mirror_step
from flwr_hyperprism.math.models import DECISION, REPRESENTATION
from flwr_hyperprism.math.seeding import round_seed
from flwr_hyperprism.setup.config import RunConfig

from .base.learner import Learner, LocalUpdate, clone_tensors, load_optimizer_state, optimizer_state
from .base.node import GossipNode
from .base.plan import RoutingPlan
from .base.rule import NodeState, NodeTask, StateDict
from .base.screening import nonfinite_fault
from .base.spec import AlgorithmSpec

TRACKER = "tracker"  # p-modes descent and tracking: the gradient tracker, routed with the model
TRACKED_MODES = ("descent", "tracking")


def flatten(tensors: StateDict, names: list[str]) -> Tensor:
    """The named tensors as one vector, in ``names`` order."""
    return torch.cat([tensors[n].reshape(-1) for n in names])


class HyperPrism(RoutingPlan):
    """Routing-only HyperPrism orchestrator (MH weights on a time-varying graph)."""

    algorithm = "hyperprism"
    description = "HyperPrism"
    config_keys = ("p_mode", "fixed_p", "p_schedule", "p_max", "p_min", "p_horizon", "p_step",
                   "p_candidates", "p_select", "hn_input", "embedding_dim", "hn_hidden", "hn_lr",
                   "hn_p_init", "p_trust")


class NodeHypernetwork:
    """A node's hypernetwork HN_i (seeded per node) and its SGD optimizer (p-mode hypernetwork).

    The module and optimizer are reused across round-trips (and runs, when the node rule is
    cached); their weights travel in the node state groups ``hypernet`` and ``hn_optimizer``.
    ``num_tensors``: how many parameter tensors the gradient summary describes.
    """

    def __init__(self, config: RunConfig, partition_id: int, num_tensors: int,
                 device: torch.device) -> None:
        summary_dim = SUMMARY_STATS * num_tensors if config.hn_input == "gradient" else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed(config.seed, partition_id, 0x4E))
            self.module = HyperNetwork(summary_dim, config.candidates, config.embedding_dim,
                                       config.hn_hidden, config.p_select,
                                       config.hn_p_init or None).to(device)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=config.hn_lr)
        self.initial = clone_tensors(self.module.state_dict())  # every new state starts here

    def init_state(self) -> dict[str, StateDict]:
        return {"hypernet": clone_tensors(self.initial), "hn_optimizer": {}}

    def load(self, state: NodeState) -> None:
        self.module.load_state_dict(state.tensors["hypernet"])
        load_optimizer_state(self.optimizer, state.tensors["hn_optimizer"])

    def save(self) -> dict[str, StateDict]:
        return {"hypernet": clone_tensors(self.module.state_dict()),
                "hn_optimizer": optimizer_state(self.optimizer)}

    def step(self, merged: StateDict, gradient: StateDict) -> None:
        """One SGD step on psi_i and v_i along <gradient, d merged / d (psi_i, v_i)>: the
        chain rule of the local loss through the merge, with ``gradient`` its gradient at the
        merged model."""
        self.optimizer.zero_grad()
        names = [n for n in gradient if merged[n].requires_grad]
        torch.autograd.backward([merged[n] for n in names], [gradient[n] for n in names])
        self.optimizer.step()


class HyperPrismNode(GossipNode):
    """Mirror-space power-mean merges with degrees from ``p-mode``."""

    riders = (TRACKER,)

    @classmethod
    def conserved_degree(cls, config: RunConfig) -> float | None:
        """With one fixed degree p the merge conserves the mirror-space mass of degree p."""
        return config.fixed_p if config.p_mode == "fixed" else None

    def __init__(self, config: RunConfig, partition_id: int, learner: Learner) -> None:
        super().__init__(config, partition_id, learner)
        self.names = [n for names in self.groups.values() for n in names]  # flattening order
        self.summary = torch.zeros(SUMMARY_STATS * len(self.names))
        self.hypernet = (NodeHypernetwork(config, partition_id, len(self.names), learner.device)
                         if config.p_mode == "hypernetwork" else None)
        self.pending: StateDict | None = None  # a merge whose hypernetwork step waits for training
        self.tracks = config.p_mode in TRACKED_MODES

    def init_extra(self) -> dict[str, StateDict]:
        extra = {"grad_summary": {"summary": torch.zeros_like(self.summary)}}
        if self.tracks:  # the last local update g^(t-1) (and p-mode tracking's p)
            extra["tracking"] = {"local_update": torch.zeros_like(
                flatten(self.learner.initial_model, self.names))}
            if self.config.p_mode == "tracking":
                extra["tracking"]["p"] = torch.tensor(self.config.p_max, dtype=torch.float64)
        if self.hypernet is not None:
            extra.update(self.hypernet.init_state())
        return extra

    def load_extra(self, state: NodeState) -> None:
        # after a divergence (``diverged``) the next merge is linear
        self.linear_merge = "diverged" in state.tensors
        self.diverged_now = False
        self.summary = state.tensors["grad_summary"]["summary"]
        if self.tracks:
            self.local_update = state.tensors["tracking"]["local_update"]
            if self.config.p_mode == "tracking":
                self.p = float(state.tensors["tracking"]["p"])
        if self.hypernet is not None:
            self.hypernet.load(state)

    def save_extra(self) -> dict[str, StateDict]:
        extra: dict[str, StateDict] = {"grad_summary": {"summary": self.summary}}
        if self.diverged_now:
            extra["diverged"] = {"flag": torch.ones(())}
        if self.tracks:
            extra["tracking"] = {"local_update": self.local_update.clone()}
            if self.config.p_mode == "tracking":
                extra["tracking"]["p"] = torch.tensor(self.p, dtype=torch.float64)
        if self.hypernet is not None:
            extra.update(self.hypernet.save())
        return extra

    def round_trip(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
                   gen: torch.Generator) -> tuple[NodeState, dict[str, float]]:
        self.round = task.round  # the round a degree schedule is evaluated at
        self.tracker = state.shared.get(TRACKER)  # sent with the model (p-mode tracking)
        new, metrics = super().round_trip(state, task, neighbours, gen)
        if self.tracker is not None:
            new.tensors["shared"][TRACKER] = self.tracker.clone()
        return new, metrics

    def combine(self, models: list[StateDict], weights: Tensor, gen: torch.Generator,
                metrics: dict[str, float]) -> StateDict:
        """Power-mean merge with the node's degrees (``p-mode``), then, with the hypernetwork,
        one hypernetwork step: through the merge, with the gradient of a fresh minibatch at
        the merged model (the learner's ``probe``), or, for a learner that knows gradients only
        through training, with the local update's pseudo-gradient (``trained``)."""
        self.pending = None
        self.tracker_mixed = self._mixed_tracker(models, weights) if self.tracks else None
        if self.linear_merge:
            degrees = dict.fromkeys(self.groups, torch.tensor(self.config.p_min,
                                                              device=weights.device))
        elif self.hypernet is not None:
            degrees = self.hypernet.module(self.summary)
        elif self.config.p_mode == "descent":
            degrees = {g: torch.tensor(p, device=weights.device)
                       for g, p in self._descent_degrees(models, weights).items()}
        else:  # one degree for both layer groups
            degrees = dict.fromkeys(self.groups, torch.tensor(self._one_degree(models, weights),
                                                              device=weights.device))
        self.degrees = {g: float(p.detach()) for g, p in degrees.items()}
        metrics.update(p_theta=self.degrees[REPRESENTATION], p_phi=self.degrees[DECISION])
        # alone (d loss / d p = 0) or linear after a divergence: no hypernetwork step
        trained_hypernet = self.hypernet if len(models) > 1 and not self.linear_merge else None
        with torch.set_grad_enabled(trained_hypernet is not None):
            merged = merge_models(models, weights, degrees, self.groups)
        detached = {k: v.detach() for k, v in merged.items()}
        # a non-finite merge (rolled back by the node) must not reach the hypernetwork
        if trained_hypernet is not None and nonfinite_fault(detached) is None:
            probe = self.learner.probe(detached, gen)
            if probe is None:
                self.pending = merged
            else:
                metrics["hn_loss"], gradient = probe
                trained_hypernet.step(merged, gradient)
        return detached

    def _one_degree(self, models: list[StateDict], weights: Tensor) -> float:
        """The degree of p-mode schedule, tracking or fixed (the same for both groups)."""
        config = self.config
        if config.p_mode == "schedule":
            return scheduled_degree(config.p_schedule, self.round, config.p_max, config.p_min,
                                    config.p_horizon)
        if config.p_mode == "tracking":
            return self._tracked_degree(models, weights)
        return config.fixed_p

    def _mixed_tracker(self, models: list[StateDict], weights: Tensor) -> Tensor | None:
        """sum_j a_ij y_j over the merge's models: the estimate of the network's gradient
        (None until every model carries a tracker, i.e. in round-trip 1)."""
        if any(TRACKER not in m for m in models):
            return None
        mixed: Tensor = sum(w * m[TRACKER] for w, m in zip(weights.tolist(), models))
        return mixed

    def _descent_degrees(self, models: list[StateDict], weights: Tensor) -> dict[str, float]:
        """p-mode descent: per layer group, the degree whose merge lands nearest the step
        -p_trust * lr * (mixed tracker) from the linear merge (``descent_degree``): p-min
        unless a larger degree is predicted to lower the network's loss. Without trackers
        (round-trip 1, a neighbour that has not trained yet) or neighbours: p-min."""
        grid = degree_grid(self.config.p_min, self.config.p_max)
        degrees = dict.fromkeys(self.groups, self.config.p_min)
        if self.tracker_mixed is None or len(models) < 2:
            return degrees
        offset = 0
        step = -self.config.p_trust * self.config.lr * self.tracker_mixed
        for group, names in self.groups.items():
            size = sum(models[0][n].numel() for n in names)
            if names:
                degrees[group] = descent_degree(stack_group(models, names), weights,
                                                step[offset:offset + size], grid)
            offset += size
        return degrees

    def _tracked_degree(self, models: list[StateDict], weights: Tensor) -> float:
        """p-mode tracking: step p against the sign of the tracked d loss / d p.

        The neighbourhood's trackers, mixed with the merge's weights, estimate the network-mean
        gradient g; d loss / d p ~ <g, d merge / d p> at the node's current p. Until every
        model carries a tracker (round 1) p stays where it is.
        """
        if self.tracker_mixed is None or len(models) < 2:  # alone: d merge / d p = 0
            return self.p
        p = torch.tensor(self.p, requires_grad=True, device=weights.device)
        with torch.enable_grad():
            merged = merge_models(models, weights, dict.fromkeys(self.groups, p), self.groups)
            (slope,) = torch.autograd.grad(flatten(merged, self.names), p,
                                           grad_outputs=self.tracker_mixed)
        self.p = tracked_degree_step(self.p, float(slope), self.config.p_step,
                                     self.config.p_min, self.config.p_max)
        return self.p

    def diverged(self) -> None:
        """Back off: the next merge is linear (p-min), and p-mode tracking's p restarts there."""
        self.diverged_now = True
        if self.config.p_mode == "tracking":
            self.p = self.config.p_min

    def combine_with_step(self, models: list[StateDict], weights: Tensor, step: StateDict,
                          gen: torch.Generator, metrics: dict[str, float]) -> StateDict:
        """Eq. 6: the local update is added in mirror space, s_p^{-1}(s_p(merged) + step)."""
        merged = self.combine(models, weights, gen, metrics)
        return {name: mirror_step(merged[name], step[name], self.degrees[group])
                for group, names in self.groups.items() for name in names}

    def trained(self, start: StateDict, update: LocalUpdate) -> None:
        """The next gradient summary, the pending hypernetwork step and, with p-mode tracking,
        the tracker: y <- sum_j a_ij y_j + g^t - g^(t-1), with the local update as a gradient,
        g = (start - trained) / lr."""
        self.summary = gradient_summary(update.gradient.values())
        if self.pending is not None:
            assert self.hypernet is not None  # only its merges wait
            self.hypernet.step(self.pending, {n: (start[n] - update.model[n]) / self.config.lr
                                              for n in self.pending})
            self.pending = None
        if self.tracks:
            g = (flatten(start, self.names) - flatten(update.model, self.names)) / self.config.lr
            mixed = self.tracker_mixed if self.tracker_mixed is not None else 0.0
            self.tracker = mixed + g - self.local_update
            self.local_update = g

SPEC = AlgorithmSpec(HyperPrism, HyperPrismNode)
