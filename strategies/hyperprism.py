"""HyperPrism (NeurIPS 2024): orchestration and node update, side by side.

Orchestrator: the shared routing loop with Metropolis-Hastings weights on G(t) (nothing to add).
Node i, one round-trip (the paper's Algorithm 1, synchronous; the merge completes the previous
round's adapt-then-combine step with the neighbours' freshly trained models):
  1. (p_theta, p_phi) = HN_i(v_i, gradient summary)      -- or fixed p (ablation; p = 1: D-PSGD)
  2. merge per layer group in mirror space: w_i <- WPM_p({w_j}_{j in N_i + i}; a_i.)
  3. train HN_i: loss of the merged model on a fresh minibatch, backpropagated through the merge
     into the hypernetwork and v_i (neighbours' models are constants)
  4. evaluate the merged model on the global test set (the paper's per-round accuracy)
  5. local training (SGD, one epoch by default) -> new gradient summary; reply with the model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.data import NUM_CLASSES
from flwr_hyperprism.graphs import round_seed
from flwr_hyperprism.hypernetwork import SUMMARY_STATS, HyperNetwork, gradient_summary
from flwr_hyperprism.mirror import power_mean
from flwr_hyperprism.models import DECISION, REPRESENTATION, build_model, layer_group

from .decentralized import (
    DecentralizedStrategy, NodeData, NodeState, NodeTask, StateDict, node_data,
    screen_neighbours,
)

log = logging.getLogger("flwr")

EVAL_BATCH = 2048


class HyperPrism(DecentralizedStrategy):
    """Routing-only HyperPrism orchestrator (MH weights on a time-varying graph)."""

    algorithm = "hyperprism"


class HyperPrismNode:
    """HyperPrism's node rule for one partition (stateless; state lives in ``NodeState``)."""

    def __init__(self, config: RunConfig, partition_id: int, data: NodeData) -> None:
        self.config, self.partition_id, self.data = config, partition_id, data
        self.model = build_model(config.model, data.input_shape, NUM_CLASSES, config.seed)
        names = [name for name, _ in self.model.named_parameters()]
        self.groups = {g: [n for n in names if layer_group(n) == g]
                       for g in (REPRESENTATION, DECISION)}
        self.hypernet: HyperNetwork | None = None
        if config.p_mode == "hypernetwork":
            summary_dim = SUMMARY_STATS * len(names) if config.hn_input == "gradient" else 0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(round_seed(config.seed, partition_id, 0x4E))
                self.hypernet = HyperNetwork(summary_dim, config.candidates,
                                             config.embedding_dim, config.hn_hidden,
                                             config.p_select, config.hn_p_init or None)
            self.hn_optimizer = torch.optim.SGD(self.hypernet.parameters(), lr=config.hn_lr)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                         momentum=config.momentum)

    @classmethod
    def for_partition(cls, config: RunConfig, partition_id: int) -> HyperPrismNode:
        return cls(config, partition_id, node_data(config, partition_id))

    def init_state(self) -> NodeState:
        tensors = {"model": _clone(self.model.state_dict()), "optimizer": {},
                   "grad_summary": {"summary": torch.zeros(SUMMARY_STATS * sum(
                       len(v) for v in self.groups.values()))}}
        if self.hypernet is not None:
            tensors["hypernet"] = _clone(self.hypernet.state_dict())
            tensors["hn_optimizer"] = {}
        return NodeState(0, tensors)

    def step(self, state: NodeState, task: NodeTask, neighbour_models: Mapping[int, StateDict]
             ) -> tuple[NodeState, dict[str, float]]:
        with _single_thread():
            return self._step(state, task, neighbour_models)

    def _step(self, state: NodeState, task: NodeTask, neighbour_models: Mapping[int, StateDict]
              ) -> tuple[NodeState, dict[str, float]]:
        gen = torch.Generator().manual_seed(round_seed(self.config.seed, self.partition_id,
                                                       task.round))
        self.model.load_state_dict(state.model)
        load_optimizer_state(self.optimizer, state.tensors["optimizer"])
        summary = state.tensors["grad_summary"]["summary"]
        task, dropped = screen_neighbours(state.model, task, neighbour_models)
        if dropped:
            log.warning("round-trip %s: partition %s dropped unusable models of neighbours %s",
                        task.round, self.partition_id, dropped)
        metrics: dict[str, float] = {"neighbours": float(len(task.neighbours)),
                                     "neighbours_dropped": float(len(dropped))}

        if self.hypernet is not None:
            self.hypernet.load_state_dict(state.tensors["hypernet"])
            load_optimizer_state(self.hn_optimizer, state.tensors["hn_optimizer"])
            degrees = self.hypernet(summary)
        else:
            degrees = dict.fromkeys(self.groups, torch.tensor(self.config.fixed_p))

        models = [state.model] + [neighbour_models[j] for j in task.neighbours]
        weights = torch.tensor((task.self_weight,) + task.weights)
        with torch.set_grad_enabled(self.hypernet is not None and len(models) > 1):
            merged = merge_models(models, weights, degrees, self.groups)
            if merged[next(iter(merged))].requires_grad:
                metrics["hn_loss"] = self._train_hypernet(merged, gen)

        self.model.load_state_dict({k: v.detach() for k, v in merged.items()})
        metrics["accuracy"], metrics["loss"] = evaluate(self.model, self.data.test)
        metrics.update(p_theta=float(degrees[REPRESENTATION].detach()),
                       p_phi=float(degrees[DECISION].detach()),
                       num_examples=float(len(self.data.train)))
        if task.train:
            metrics["train_loss"], summary = self._train_locally(gen)

        tensors = {"model": _clone(self.model.state_dict()),
                   "optimizer": optimizer_state(self.optimizer),
                   "grad_summary": {"summary": summary}}
        if self.hypernet is not None:
            tensors["hypernet"] = _clone(self.hypernet.state_dict())
            tensors["hn_optimizer"] = optimizer_state(self.hn_optimizer)
        return NodeState(task.round, tensors), metrics

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

    def _train_locally(self, gen: torch.Generator) -> tuple[float, Tensor]:
        """SGD over the node's data; returns mean loss and the last gradient's summary."""
        train, batch = self.data.train, self.config.batch_size
        steps = self.config.local_steps or self.config.local_epochs * -(-len(train) // batch)
        order = torch.empty(0, dtype=torch.int64)
        losses = []
        self.model.train()
        for _ in range(steps):
            if len(order) == 0:
                order = torch.randperm(len(train), generator=gen)
            idx, order = order[:batch], order[batch:]
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(train.x[idx]), train.y[idx])
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        summary = gradient_summary(p.grad for p in self.model.parameters())
        return sum(losses) / len(losses), summary


def merge_models(models: list[StateDict], weights: Tensor, degrees: Mapping[str, Tensor],
                 groups: Mapping[str, list[str]]) -> StateDict:
    """Weighted power mean of k models, per layer group with that group's degree.

    Args:
        models: k state dicts with identical keys and shapes (own model first).
        weights: (k,) mixing weights summing to 1.
        degrees: {group: p} with p >= 1 (0-d tensors; gradients flow to them).
        groups: {group: parameter names}.
    Returns:
        The merged state dict (one power mean over each group's concatenated parameters).
    """
    merged: StateDict = {}
    for group, names in groups.items():
        if not names:
            continue
        stacked = torch.stack([torch.cat([m[n].reshape(-1) for n in names]) for m in models])
        flat = power_mean(stacked, weights, degrees[group])
        for name, chunk in zip(names, flat.split([models[0][n].numel() for n in names])):
            merged[name] = chunk.view_as(models[0][name])
    return merged


@torch.no_grad()
def evaluate(model: torch.nn.Module, test) -> tuple[float, float]:
    """Accuracy (fraction) and mean cross-entropy of ``model`` on a ``Split``."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(test), EVAL_BATCH):
        logits = model(test.x[start:start + EVAL_BATCH])
        labels = test.y[start:start + EVAL_BATCH]
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return correct / len(test), loss / len(test)


def optimizer_state(optimizer: torch.optim.Optimizer) -> StateDict:
    """The optimizer's per-parameter tensors as a flat dict ``"<index>.<name>"``."""
    return {f"{index}.{name}": value.detach().clone()
            for index, slots in optimizer.state_dict()["state"].items()
            for name, value in slots.items() if torch.is_tensor(value)}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: StateDict) -> None:
    """Inverse of ``optimizer_state`` (an empty dict resets the optimizer)."""
    slots: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value.clone()
    optimizer.load_state_dict({"state": slots,
                               "param_groups": optimizer.state_dict()["param_groups"]})


def _clone(tensors: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in tensors.items()}


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # One intra-op thread: a node's arithmetic (and so every metric) is then identical in
    # Flower's actors and in-process, whatever the machine's core count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
