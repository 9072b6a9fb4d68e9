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

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flwr_hyperprism.math.degrees import (
    P_SCHEDULES,
    bounded_step,
    degree_grid,
    descent_degree,
    scheduled_degree,
    tracked_degree_step,
)
from flwr_hyperprism.math.hypernetwork import (
    HN_INPUTS,
    P_SELECT_MODES,
    SUMMARY_STATS,
    HyperNetwork,
    gradient_summary,
    parse_candidates,
)
from flwr_hyperprism.math.merge import merge_models, stack_group
from flwr_hyperprism.math.mirror import mirror_step
from flwr_hyperprism.math.models import DECISION, REPRESENTATION
from flwr_hyperprism.math.seeding import round_seed
from flwr_hyperprism.math.sgd import MomentumSGD
from flwr_hyperprism.setup.config import RunConfig
from flwr_hyperprism.setup.settings import AlgorithmSettings

from .base.learner import Learner, LocalUpdate, clone_tensors
from .base.node import GossipNode
from .base.plan import RoutingPlan
from .base.rule import NodeState, NodeTask, StateDict
from .base.screening import nonfinite_fault
from .base.spec import AlgorithmSpec

TRACKER = "tracker"  # p-modes descent and tracking: the gradient tracker, routed with the model
P_MODES = ("descent", "tracking", "hypernetwork", "fixed", "schedule")
TRACKED_MODES = ("descent", "tracking")


@dataclass(frozen=True)
class HyperPrismSettings(AlgorithmSettings):
    """How HyperPrism's nodes choose their degrees p_theta, p_phi."""

    # how the degrees are chosen: 'descent' (per node, round and layer group: the degree whose
    # merge is predicted to lower the network's loss, estimated with a gradient tracker, most
    # within a trust region; p = 1 unless a larger one is predicted to help; docs/algorithms.md),
    # 'tracking' (per node: p starts at p-max and moves p-step per round against the tracked
    # d loss/d p), 'hypernetwork' (the paper's), 'fixed' (fixed-p for both layer groups) or
    # 'schedule' (p-schedule from p-max to p-min over p-horizon rounds, the same on every node)
    p_mode: str = "descent"
    fixed_p: float = 1.0  # p-mode fixed: the degree of both layer groups
    p_schedule: str = "step"  # step, linear, cosine or exponential (math/degrees.py)
    p_max: float = 15.0  # the largest degree (schedule start, tracking start, grid top)
    p_min: float = 1.0  # the smallest degree (1: plain averaging)
    p_horizon: int = 10  # rounds (the exponential's time constant)
    p_step: float = 1.0  # 'tracking': degrees p moves per round against the tracked d loss/d p
    # 'descent': how far a merge may depart from the linear merge, in local updates: the
    # trust region's radius is p-trust times lr times the tracked gradient
    p_trust: float = 1.0
    p_candidates: str = "1,3,5,7,9,11,13,15"  # the hypernetwork's degrees
    p_select: str = "soft"  # expectation over candidates; 'st' = argmax, straight-through
    hn_input: str = "gradient"  # embedding + gradient summary; 'embedding' = embedding only
    embedding_dim: int = 32  # the hypernetwork's node embedding v_i
    hn_hidden: int = 64  # the hypernetwork's hidden width
    hn_lr: float = 0.01  # the hypernetwork's SGD step size
    hn_p_init: float = 0.0  # 0: heads start near uniform (p ~ 8); else start p near this degree

    def validate(self) -> None:
        self.require_choices({"p_mode": P_MODES, "p_schedule": P_SCHEDULES,
                              "p_select": P_SELECT_MODES, "hn_input": HN_INPUTS})
        self.require_ranges([
            ("fixed_p", 1.0, None, ">= 1"), ("p_min", 1.0, None, ">= 1"),
            ("p_max", self.p_min, None, ">= p-min"), ("p_horizon", 1, None, "an integer >= 1"),
            ("embedding_dim", 1, None, ">= 1"), ("hn_hidden", 1, None, ">= 1")])
        self.require_positive(("p_step", "p_trust", "hn_lr"))
        candidates = self.candidates
        if self.hn_p_init != 0.0 and not min(candidates) <= self.hn_p_init <= max(candidates):
            raise ValueError(f"config key 'hn-p-init' must be 0 or within the p-candidates "
                             f"[{min(candidates)}, {max(candidates)}], got {self.hn_p_init!r}")

    def check(self, config: RunConfig) -> None:
        if self.p_mode in TRACKED_MODES and config.order != "atc":
            default = " (the default)" if self.p_mode == HyperPrismSettings.p_mode else ""
            raise ValueError(f"p-mode={self.p_mode!r}{default} needs order='atc': its gradient "
                             f"tracker takes the local update of the merged model; for "
                             f"order='cta' set p-mode to 'hypernetwork', 'fixed' or 'schedule'")

    @property
    def candidates(self) -> tuple[float, ...]:
        """The hypernetwork's candidate degrees (``p-candidates``)."""
        return parse_candidates(self.p_candidates)


def flatten(tensors: StateDict, names: list[str]) -> Tensor:
    """The named tensors as one vector, in ``names`` order."""
    return torch.cat([tensors[n].reshape(-1) for n in names])


class HyperPrism(RoutingPlan):
    """HyperPrism's routing plan (MH weights on a time-varying graph)."""

    algorithm = "hyperprism"
    description = "HyperPrism"


class NodeHypernetwork:
    """A node's hypernetwork HN_i (seeded per node) and its SGD optimizer (p-mode hypernetwork).

    The module and optimizer are scratch space reused across round-trips: each round-trip
    loads the node's weights from its extra state (groups ``hypernet`` and ``hn_optimizer``)
    and a step writes them back there.
    ``num_tensors``: how many parameter tensors the gradient summary describes.
    """

    def __init__(self, config: RunConfig, partition_id: int, num_tensors: int,
                 device: torch.device) -> None:
        settings = HyperPrismSettings.of(config)
        summary_dim = SUMMARY_STATS * num_tensors if settings.hn_input == "gradient" else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed(config.seed, partition_id, 0x4E))
            self.module = HyperNetwork(summary_dim, settings.candidates, settings.embedding_dim,
                                       settings.hn_hidden, settings.p_select,
                                       settings.hn_p_init or None).to(device)
        self.optimizer = MomentumSGD(self.module.parameters(), settings.hn_lr)
        self.initial = clone_tensors(self.module.state_dict())  # every new state starts here

    def init_state(self) -> dict[str, StateDict]:
        return {"hypernet": clone_tensors(self.initial), "hn_optimizer": {}}

    def load(self, extra: HyperPrismExtra) -> None:
        """Put the node's hypernetwork weights and optimizer state into the module."""
        assert extra.hypernet is not None and extra.hn_optimizer is not None
        self.module.load_state_dict(extra.hypernet)
        self.optimizer.load_state(extra.hn_optimizer)

    def step(self, merged: StateDict, gradient: StateDict, extra: HyperPrismExtra
             ) -> HyperPrismExtra:
        """One SGD step on psi_i and v_i along <gradient, d merged / d (psi_i, v_i)>: the
        chain rule of the local loss through the merge, with ``gradient`` its gradient at the
        merged model; ``extra`` with the new weights."""
        self.optimizer.zero_grad()
        names = [n for n in gradient if merged[n].requires_grad]
        torch.autograd.backward([merged[n] for n in names], [gradient[n] for n in names])
        self.optimizer.step()
        return dataclasses.replace(extra, hypernet=clone_tensors(self.module.state_dict()),
                                   hn_optimizer=self.optimizer.state())


@dataclass(frozen=True)
class HyperPrismExtra:
    """A HyperPrism node's own state (groups ``grad_summary``, ``tracking``, ``hypernet``,
    ``hn_optimizer``, ``diverged``) and what its hooks hand each other within a round-trip.

    Attributes
    ----------
    summary : (SUMMARY_STATS * tensors,) the last local update's gradient summary (the
        hypernetwork's input)
    local_update : (n,) p-modes descent and tracking: the last local update g^(t-1) as a
        gradient, flattened in ``names`` order
    p : p-mode tracking: the node's degree
    hypernet, hn_optimizer : p-mode hypernetwork: HN_i's weights and optimizer state
    linear_merge : the previous round-trip diverged: this one merges linearly (p-min)
    diverged : this round-trip diverged (saved as the group ``diverged``)
    tracker : (n,) the gradient tracker y_i routed with the model (None before training)
    tracker_mixed : (n,) sum_j a_ij y_j of this round-trip's merge
    degrees : {group: p} of this round-trip's merge
    pending : a merge whose hypernetwork step waits for the local update (plug-in learners)
    round : the round-trip's round (p-mode schedule's degree depends on it)
    """

    summary: Tensor
    local_update: Tensor | None = None
    p: float | None = None
    hypernet: StateDict | None = None
    hn_optimizer: StateDict | None = None
    linear_merge: bool = False
    diverged: bool = False
    tracker: Tensor | None = None
    tracker_mixed: Tensor | None = None
    degrees: dict[str, float] = field(default_factory=dict)
    pending: StateDict | None = None
    round: int = 0

    @classmethod
    def from_state(cls, state: NodeState, round_: int) -> HyperPrismExtra:
        """The extra state ``to_groups`` saved in ``state``, for round-trip ``round_``."""
        groups = state.tensors
        tracking = groups.get("tracking", {})
        return cls(groups["grad_summary"]["summary"], tracking.get("local_update"),
                   float(tracking["p"]) if "p" in tracking else None, groups.get("hypernet"),
                   groups.get("hn_optimizer"), linear_merge="diverged" in groups,
                   tracker=state.shared.get(TRACKER), round=round_)

    def to_groups(self) -> dict[str, StateDict]:
        groups: dict[str, StateDict] = {"grad_summary": {"summary": self.summary}}
        if self.diverged:
            groups["diverged"] = {"flag": torch.ones(())}
        if self.local_update is not None:
            groups["tracking"] = {"local_update": self.local_update.clone()}
            if self.p is not None:
                groups["tracking"]["p"] = torch.tensor(self.p, dtype=torch.float64)
        if self.hypernet is not None and self.hn_optimizer is not None:
            groups.update(hypernet=self.hypernet, hn_optimizer=self.hn_optimizer)
        return groups


class HyperPrismNode(GossipNode[HyperPrismExtra]):
    """Mirror-space power-mean merges with degrees from ``p-mode``."""

    riders = (TRACKER,)

    @classmethod
    def conserved_degree(cls, config: RunConfig) -> float | None:
        """With one fixed degree p the merge conserves the mirror-space mass of degree p."""
        settings = HyperPrismSettings.of(config)
        return settings.fixed_p if settings.p_mode == "fixed" else None

    def __init__(self, config: RunConfig, partition_id: int, learner: Learner) -> None:
        super().__init__(config, partition_id, learner)
        self.settings = HyperPrismSettings.of(config)
        self.names = [n for names in self.groups.values() for n in names]  # flattening order
        self.hypernet = (NodeHypernetwork(config, partition_id, len(self.names), learner.device)
                         if self.settings.p_mode == "hypernetwork" else None)
        self.tracks = self.settings.p_mode in TRACKED_MODES

    def init_extra(self) -> dict[str, StateDict]:
        extra = {"grad_summary": {"summary": torch.zeros(SUMMARY_STATS * len(self.names))}}
        if self.tracks:  # the last local update g^(t-1) (and p-mode tracking's p)
            extra["tracking"] = {"local_update": torch.zeros_like(
                flatten(self.learner.initial_model, self.names))}
            if self.settings.p_mode == "tracking":
                extra["tracking"]["p"] = torch.tensor(self.settings.p_max, dtype=torch.float64)
        if self.hypernet is not None:
            extra.update(self.hypernet.init_state())
        return extra

    def load_extra(self, state: NodeState, task: NodeTask) -> HyperPrismExtra:
        return HyperPrismExtra.from_state(state, task.round)

    def riders_of(self, extra: HyperPrismExtra) -> StateDict:
        return {TRACKER: extra.tracker.clone()} if extra.tracker is not None else {}

    def combine(self, models: list[StateDict], weights: Tensor, gen: torch.Generator,
                metrics: dict[str, float], extra: HyperPrismExtra
                ) -> tuple[StateDict, HyperPrismExtra]:
        """Power-mean merge with the node's degrees (``p-mode``), then, with the hypernetwork,
        one hypernetwork step: through the merge, with the gradient of a fresh minibatch at
        the merged model (the learner's ``probe``), or, for a learner that knows gradients only
        through training, with the local update's pseudo-gradient (``trained``)."""
        extra = dataclasses.replace(extra, pending=None, tracker_mixed=(
            self._mixed_tracker(models, weights) if self.tracks else None))
        if extra.linear_merge:
            degrees = dict.fromkeys(self.groups, torch.tensor(self.settings.p_min,
                                                              device=weights.device))
        elif self.hypernet is not None:
            self.hypernet.load(extra)
            degrees = self.hypernet.module(extra.summary)
        elif self.settings.p_mode == "descent":
            degrees = {g: torch.tensor(p, device=weights.device)
                       for g, p in self._descent_degrees(models, weights, extra).items()}
        else:  # one degree for both layer groups
            p, extra = self._one_degree(models, weights, extra)
            degrees = dict.fromkeys(self.groups, torch.tensor(p, device=weights.device))
        extra = dataclasses.replace(extra, degrees={g: float(p.detach())
                                                    for g, p in degrees.items()})
        metrics.update(p_theta=extra.degrees[REPRESENTATION], p_phi=extra.degrees[DECISION])
        # alone (d loss / d p = 0) or linear after a divergence: no hypernetwork step
        trained_hypernet = self.hypernet if len(models) > 1 and not extra.linear_merge else None
        with torch.set_grad_enabled(trained_hypernet is not None):
            merged = merge_models(models, weights, degrees, self.groups)
        detached = {k: v.detach() for k, v in merged.items()}
        # a non-finite merge (rolled back by the node) must not reach the hypernetwork
        if trained_hypernet is not None and nonfinite_fault(detached) is None:
            probe = self.learner.probe(detached, gen)
            if probe is None:
                extra = dataclasses.replace(extra, pending=merged)
            else:
                metrics["hn_loss"], gradient = probe
                extra = trained_hypernet.step(merged, gradient, extra)
        return detached, extra

    def _one_degree(self, models: list[StateDict], weights: Tensor, extra: HyperPrismExtra
                    ) -> tuple[float, HyperPrismExtra]:
        """The degree of p-mode schedule, tracking or fixed (the same for both groups)."""
        settings = self.settings
        if settings.p_mode == "schedule":
            return scheduled_degree(settings.p_schedule, extra.round, settings.p_max,
                                    settings.p_min, settings.p_horizon), extra
        if settings.p_mode == "tracking":
            p = self._tracked_degree(models, weights, extra)
            return p, dataclasses.replace(extra, p=p)
        return settings.fixed_p, extra

    def _mixed_tracker(self, models: list[StateDict], weights: Tensor) -> Tensor | None:
        """sum_j a_ij y_j over the merge's models: the estimate of the network's gradient
        (None until every model carries a tracker, i.e. in round-trip 1)."""
        if any(TRACKER not in m for m in models):
            return None
        mixed: Tensor = sum(w * m[TRACKER] for w, m in zip(weights.tolist(), models))
        return mixed

    def _descent_degrees(self, models: list[StateDict], weights: Tensor,
                         extra: HyperPrismExtra) -> dict[str, float]:
        """p-mode descent: per layer group, the degree whose merge lands nearest the step
        -p_trust * lr * (mixed tracker) from the linear merge (``descent_degree``): p-min
        unless a larger degree is predicted to lower the network's loss. Without trackers
        (round-trip 1, a neighbour that has not trained yet) or neighbours: p-min.

        The step is no longer than p_trust times the node's own last local update (per
        group), so a merge departs from the linear one by at most twice that, whatever its
        neighbours' trackers say: a diverging neighbour's tracker, mixed in, would otherwise
        ask for the largest degree, whose merge follows that neighbour's largest values."""
        grid = degree_grid(self.settings.p_min, self.settings.p_max)
        degrees = dict.fromkeys(self.groups, self.settings.p_min)
        if extra.tracker_mixed is None or extra.local_update is None or len(models) < 2:
            return degrees
        offset = 0
        scale = self.settings.p_trust * self.config.lr
        for group, names in self.groups.items():
            size = sum(models[0][n].numel() for n in names)
            if names:
                step = bounded_step(-scale * extra.tracker_mixed[offset:offset + size],
                                    scale * extra.local_update[offset:offset + size])
                degrees[group] = descent_degree(stack_group(models, names), weights, step,
                                                grid)
            offset += size
        return degrees

    def _tracked_degree(self, models: list[StateDict], weights: Tensor,
                        extra: HyperPrismExtra) -> float:
        """p-mode tracking: step p against the sign of the tracked d loss / d p.

        The neighbourhood's trackers, mixed with the merge's weights, estimate the network-mean
        gradient g; d loss / d p ~ <g, d merge / d p> at the node's current p. Until every
        model carries a tracker (round 1) p stays where it is.
        """
        assert extra.p is not None  # p-mode tracking keeps its degree
        if extra.tracker_mixed is None or len(models) < 2:  # alone: d merge / d p = 0
            return extra.p
        p = torch.tensor(extra.p, requires_grad=True, device=weights.device)
        with torch.enable_grad():
            merged = merge_models(models, weights, dict.fromkeys(self.groups, p), self.groups)
            (slope,) = torch.autograd.grad(flatten(merged, self.names), p,
                                           grad_outputs=extra.tracker_mixed)
        return tracked_degree_step(extra.p, float(slope), self.settings.p_step,
                                   self.settings.p_min, self.settings.p_max)

    def diverged(self, extra: HyperPrismExtra) -> HyperPrismExtra:
        """Back off: the next merge is linear (p-min), and p-mode tracking's p restarts there.
        The tracker takes no new local update, y <- sum_j a_ij y_j (zero before any merge of
        trackers), so it is routed even when the node's first training diverged."""
        if self.tracks:
            assert extra.local_update is not None  # tracked modes keep it
            extra = dataclasses.replace(extra, tracker=(
                extra.tracker_mixed if extra.tracker_mixed is not None
                else torch.zeros_like(extra.local_update)))
        return dataclasses.replace(extra, diverged=True, p=(
            self.settings.p_min if self.settings.p_mode == "tracking" else extra.p))

    def combine_with_step(self, models: list[StateDict], weights: Tensor, step: StateDict,
                          gen: torch.Generator, metrics: dict[str, float],
                          extra: HyperPrismExtra) -> tuple[StateDict, HyperPrismExtra]:
        """Eq. 6: the local update is added in mirror space, s_p^{-1}(s_p(merged) + step)."""
        merged, extra = self.combine(models, weights, gen, metrics, extra)
        return {name: mirror_step(merged[name], step[name], extra.degrees[group])
                for group, names in self.groups.items() for name in names}, extra

    def trained(self, start: StateDict, update: LocalUpdate, extra: HyperPrismExtra
                ) -> HyperPrismExtra:
        """The next gradient summary, the pending hypernetwork step and, with p-modes descent
        and tracking, the tracker: y <- sum_j a_ij y_j + g^t - g^(t-1), with the local
        update as a gradient, g = (start - trained) / lr."""
        extra = dataclasses.replace(extra, summary=gradient_summary(update.gradient.values()))
        if extra.pending is not None:
            assert self.hypernet is not None  # only its merges wait
            pseudo = {n: (start[n] - update.model[n]) / self.config.lr for n in extra.pending}
            extra = dataclasses.replace(self.hypernet.step(extra.pending, pseudo, extra),
                                        pending=None)
        if self.tracks:
            assert extra.local_update is not None  # tracked modes keep it
            g = (flatten(start, self.names) - flatten(update.model, self.names)) / self.config.lr
            mixed = extra.tracker_mixed if extra.tracker_mixed is not None else 0.0
            extra = dataclasses.replace(extra, tracker=mixed + g - extra.local_update,
                                        local_update=g)
        return extra


SPEC = AlgorithmSpec(HyperPrism, HyperPrismNode, HyperPrismSettings)
