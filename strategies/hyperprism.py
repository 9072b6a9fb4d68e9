"""HyperPrism (NeurIPS 2024): orchestration and node update, side by side.

Orchestrator: the shared routing loop with Metropolis-Hastings weights on G(t) (nothing to add).
Node i, one round-trip (the paper's Algorithm 1, synchronous; see ``strategies.node`` for the
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
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.degrees import scheduled_degree
from flwr_hyperprism.graphs import round_seed
from flwr_hyperprism.hypernetwork import SUMMARY_STATS, HyperNetwork, gradient_summary
from flwr_hyperprism.mirror import mirror_step
from flwr_hyperprism.models import DECISION, REPRESENTATION

from .decentralized import DecentralizedStrategy, NodeData, NodeState, NodeTask, StateDict
from .node import (
    GossipNode,
    clone_tensors,
    load_optimizer_state,
    merge_models,
    optimizer_state,
)


class HyperPrism(DecentralizedStrategy):
    """Routing-only HyperPrism orchestrator (MH weights on a time-varying graph)."""

    algorithm = "hyperprism"
    description = "HyperPrism"


def node_hypernetwork(config: RunConfig, partition_id: int, num_tensors: int
                      ) -> tuple[HyperNetwork | None, torch.optim.SGD | None]:
    """The node's hypernetwork (seeded per node) and its SGD optimizer; None with fixed p.

    ``num_tensors``: how many parameter tensors the gradient summary describes.
    """
    if config.p_mode != "hypernetwork":
        return None, None
    summary_dim = SUMMARY_STATS * num_tensors if config.hn_input == "gradient" else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(round_seed(config.seed, partition_id, 0x4E))
        hypernet = HyperNetwork(summary_dim, config.candidates, config.embedding_dim,
                                config.hn_hidden, config.p_select, config.hn_p_init or None)
    return hypernet, torch.optim.SGD(hypernet.parameters(), lr=config.hn_lr)


def initial_weights(hypernet: HyperNetwork | None) -> StateDict:
    """A copy of a freshly built hypernetwork's weights (what every new node state starts
    from; the module itself is reused and overwritten by each round-trip's state)."""
    return clone_tensors(hypernet.state_dict()) if hypernet is not None else {}


class HyperPrismNode(GossipNode):
    """Mirror-space power-mean merges with degrees from a per-node hypernetwork."""

    def __init__(self, config: RunConfig, partition_id: int, data: NodeData) -> None:
        super().__init__(config, partition_id, data)
        num_tensors = sum(len(names) for names in self.groups.values())
        self.summary = torch.zeros(SUMMARY_STATS * num_tensors)
        self.hypernet, self.hn_optimizer = node_hypernetwork(config, partition_id, num_tensors)
        self.initial_hypernet = initial_weights(self.hypernet)

    def init_extra(self) -> dict[str, StateDict]:
        extra = {"grad_summary": {"summary": torch.zeros_like(self.summary)}}
        if self.hypernet is not None:
            extra.update(hypernet=clone_tensors(self.initial_hypernet), hn_optimizer={})
        return extra

    def load_extra(self, state: NodeState) -> None:
        self.summary = state.tensors["grad_summary"]["summary"]
        if self.hypernet is not None:
            self.hypernet.load_state_dict(state.tensors["hypernet"])
            load_optimizer_state(self.hn_optimizer, state.tensors["hn_optimizer"])

    def save_extra(self) -> dict[str, StateDict]:
        extra = {"grad_summary": {"summary": self.summary}}
        if self.hypernet is not None:
            extra.update(hypernet=clone_tensors(self.hypernet.state_dict()),
                         hn_optimizer=optimizer_state(self.hn_optimizer))
        return extra

    def round_trip(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
                   gen: torch.Generator) -> tuple[NodeState, dict[str, float]]:
        self.round = task.round  # the round a degree schedule is evaluated at
        return super().round_trip(state, task, neighbours, gen)

    def combine(self, models: list[StateDict], weights: Tensor, gen: torch.Generator,
                metrics: dict[str, float]) -> StateDict:
        """Power-mean merge with the node's degrees (``p-mode``), then, with the hypernetwork,
        one hypernetwork step."""
        config = self.config
        if self.hypernet is not None:
            degrees = self.hypernet(self.summary)
        elif config.p_mode == "schedule":
            p = scheduled_degree(config.p_schedule, self.round, config.p_max, config.p_min,
                                 config.p_horizon)
            degrees = dict.fromkeys(self.groups, torch.tensor(p))
        else:
            degrees = dict.fromkeys(self.groups, torch.tensor(config.fixed_p))
        self.degrees = {g: float(p.detach()) for g, p in degrees.items()}
        metrics.update(p_theta=self.degrees[REPRESENTATION], p_phi=self.degrees[DECISION])
        train_hypernet = self.hypernet is not None and len(models) > 1  # else d loss/d p = 0
        with torch.set_grad_enabled(train_hypernet):
            merged = merge_models(models, weights, degrees, self.groups)
            if train_hypernet:
                metrics["hn_loss"] = self._train_hypernet(merged, gen)
        return {k: v.detach() for k, v in merged.items()}

    def combine_with_step(self, models: list[StateDict], weights: Tensor, step: StateDict,
                          gen: torch.Generator, metrics: dict[str, float]) -> StateDict:
        """Eq. 6: the local update is added in mirror space, s_p^{-1}(s_p(merged) + step)."""
        merged = self.combine(models, weights, gen, metrics)
        return {name: mirror_step(merged[name], step[name], self.degrees[group])
                for group, names in self.groups.items() for name in names}

    def train_locally(self, gen: torch.Generator) -> float:
        loss = super().train_locally(gen)
        self.summary = gradient_summary(p.grad for p in self.model.parameters())
        return loss

    def _train_hypernet(self, merged: StateDict, gen: torch.Generator) -> float:
        """One SGD step on psi_i and v_i: loss of the merged model (a function of p)."""
        train = self.data.train
        idx = torch.randint(len(train), (min(self.config.batch_size, len(train)),), generator=gen)
        loss = F.cross_entropy(functional_call(self.model, merged, (train.x[idx],)),
                               train.y[idx])
        self.hn_optimizer.zero_grad()
        loss.backward()
        self.hn_optimizer.step()
        return float(loss.detach())
