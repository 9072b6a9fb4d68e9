"""The node machinery shared by the algorithms: local SGD, evaluation, state, merges.

``LearningNode`` holds a node's model, optimizer and data (every algorithm's node rule builds on
it). ``GossipNode`` is a node that mixes its model with its neighbours' and trains locally; the
gossip algorithms subclass it and define how models are combined. Two orders (config ``order``):

- ``atc`` (adapt then combine, the paper's Algorithm 1; default): in round-trip t the node
  combines its neighbours' freshly trained models with its own, evaluates the result (the model
  after round t-1) and trains it locally.
- ``cta`` (combine then adapt, Lian et al.'s D-PSGD): the node evaluates its own model (the model
  after round t-1), computes a local update from it, and applies that update to the combination
  of its own and its neighbours' models: w_i <- combine_j(w_j) + update_i(w_i).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.data import NUM_CLASSES, Dataset, Split, dirichlet_partition, load_dataset
from flwr_hyperprism.graphs import round_rng, round_seed
from flwr_hyperprism.mirror import power_mean
from flwr_hyperprism.models import DECISION, REPRESENTATION, build_model, layer_group

from .rule import NodeState, NodeTask, StateDict
from .screening import screen_neighbours

log = logging.getLogger("flwr")

EVAL_BATCH = 2048
LINEAR = {REPRESENTATION: 1.0, DECISION: 1.0}  # p = 1 for both layer groups: plain averaging


@dataclass(frozen=True)
class NodeData:
    train: Split  # this node's partition
    test: Split  # the global test set

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


@lru_cache(maxsize=2)
def partitioned(dataset: str, data_dir: str, download: bool, seed: int, num_nodes: int,
                alpha: float, min_size: int) -> tuple[Dataset, tuple]:
    """The dataset and its Dirichlet partition (one index array per node; cached per process)."""
    data = load_dataset(dataset, data_dir, download, seed)
    parts = dirichlet_partition(data.train.y.numpy(), num_nodes, alpha, seed, min_size)
    return data, tuple(parts)


def node_data(config: RunConfig, partition_id: int) -> NodeData:
    """The node's training partition and the global test set (cached per process).

    With ``eval_size`` > 0 the test set is a fixed random subset of that size (the same for
    every node and round), which makes per-round evaluation of CNNs affordable on CPUs.
    """
    if not 0 <= partition_id < config.num_nodes:
        raise ValueError(f"partition id {partition_id} is outside 0..{config.num_nodes - 1} "
                         f"(num-nodes={config.num_nodes})")
    data, parts = partitioned(config.dataset, config.data_dir, config.download, config.seed,
                               config.num_nodes, config.alpha, config.min_partition_size)
    idx = torch.from_numpy(parts[partition_id])
    test = data.test
    if 0 < config.eval_size < len(test):
        keep = torch.from_numpy(round_rng(config.seed, 0xE7A1).permutation(len(test))
                                [:config.eval_size])
        test = Split(test.x[keep], test.y[keep])
    return NodeData(Split(data.train.x[idx], data.train.y[idx]), test)


class LearningNode:
    """A node rule for one partition: its model, SGD optimizer and data.

    Stateless itself (the state lives in ``NodeState``); subclasses define ``init_state`` and
    ``round_trip``. ``step`` runs a round-trip single-threaded with the round's generator.
    """

    def __init__(self, config: RunConfig, partition_id: int, data: NodeData) -> None:
        self.config, self.partition_id, self.data = config, partition_id, data
        self.model = build_model(config.model, data.input_shape, NUM_CLASSES, config.seed)
        # The model object is reused across round-trips (and runs, when the rule is cached):
        # a new state must start from the seeded initial weights, not from its current ones.
        self.initial_model = clone_tensors(self.model.state_dict())
        names = [name for name, _ in self.model.named_parameters()]
        self.groups = {g: [n for n in names if layer_group(n) == g]
                       for g in (REPRESENTATION, DECISION)}
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                         momentum=config.momentum)

    @classmethod
    def for_partition(cls, config: RunConfig, partition_id: int) -> LearningNode:
        return cls(config, partition_id, node_data(config, partition_id))

    def init_state(self) -> NodeState:
        raise NotImplementedError

    def restore(self, shared: StateDict) -> NodeState:
        """``init_state()`` with the node's last ``shared`` tensors (``NodeRule.restore``)."""
        state = self.init_state()
        return NodeState(state.round, {**state.tensors, "shared": clone_tensors(shared)})

    def round_trip(self, state: NodeState, task: NodeTask,
                   neighbours: Mapping[int, StateDict], gen: torch.Generator
                   ) -> tuple[NodeState, dict[str, float]]:
        raise NotImplementedError

    def step(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict]
             ) -> tuple[NodeState, dict[str, float]]:
        """One round-trip; ``neighbours`` maps partition ids to their shared tensors."""
        gen = torch.Generator().manual_seed(round_seed(self.config.seed, self.partition_id,
                                                       task.round))
        with _single_thread():
            return self.round_trip(state, task, neighbours, gen)

    def screen(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict]
               ) -> tuple[NodeTask, dict[str, float]]:
        """Leave out unusable neighbours (logged); the task to use and the first metrics."""
        task, metrics = screen_and_log(state.shared, task, neighbours, self.config,
                                       self.partition_id)
        return task, {**metrics, "num_examples": float(len(self.data.train))}

    @property
    def local_steps(self) -> int:
        """Minibatch steps per round: ``local-steps``, else ``local-epochs`` passes."""
        batches = -(-len(self.data.train) // self.config.batch_size)
        return self.config.local_steps or self.config.local_epochs * batches

    def train_locally(self, gen: torch.Generator) -> float:
        """``local_steps`` SGD steps on shuffled minibatches; returns the mean loss."""
        train, batch = self.data.train, self.config.batch_size
        order = torch.empty(0, dtype=torch.int64)
        losses = []
        self.model.train()
        for _ in range(self.local_steps):
            if len(order) == 0:
                order = torch.randperm(len(train), generator=gen)
            idx, order = order[:batch], order[batch:]
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(train.x[idx]), train.y[idx])
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def gradient(self, params: StateDict, gen: torch.Generator) -> tuple[float, StateDict]:
        """Loss and gradient of one random minibatch at ``params`` (the model's parameters)."""
        train = self.data.train
        idx = torch.randperm(len(train), generator=gen)[:self.config.batch_size]
        params = {k: p.detach().requires_grad_() for k, p in params.items()}
        loss = F.cross_entropy(functional_call(self.model, params, (train.x[idx],)),
                               train.y[idx])
        grads = torch.autograd.grad(loss, list(params.values()))
        return float(loss.detach()), dict(zip(params, grads))


Gradient = Callable[[StateDict], StateDict]
"""A stochastic gradient oracle: parameters in, the gradient of the local loss there out."""


class GradientMethod(Protocol):
    """A node update that needs only gradients at points it chooses (Mudag, ADOM+).

    Pure tensor arithmetic on parameter dicts: where the gradients come from (the node's own
    model and data, or the user's train handler in plug-in mode) is the caller's business.
    """

    def init_state(self, x: StateDict) -> NodeState:
        """The state at the initial parameters ``x``."""
        ...

    def round_trip(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
                   gradient: Gradient) -> tuple[NodeState, StateDict | None]:
        """The new state and the parameters to evaluate in this round-trip (None: none)."""
        ...


class GradientNode(LearningNode):
    """A ``GradientMethod`` driven by the node's own model, minibatches and test set."""

    method: ClassVar[Callable[[RunConfig], GradientMethod]]

    def __init__(self, config: RunConfig, partition_id: int, data: NodeData) -> None:
        super().__init__(config, partition_id, data)
        self.update = self.method(config)

    def init_state(self) -> NodeState:
        return self.update.init_state(
            {k: self.initial_model[k].clone() for k, _ in self.model.named_parameters()})

    def round_trip(self, state: NodeState, task: NodeTask,
                   neighbours: Mapping[int, StateDict], gen: torch.Generator
                   ) -> tuple[NodeState, dict[str, float]]:
        task, metrics = self.screen(state, task, neighbours)

        def gradient(params: StateDict) -> StateDict:
            metrics["train_loss"], grad = self.gradient(params, gen)
            return grad

        state, evaluated = self.update.round_trip(state, task, neighbours, gradient)
        if evaluated is not None:
            self.model.load_state_dict(evaluated)
            metrics["accuracy"], metrics["loss"] = evaluate(self.model, self.data.test)
        return state, metrics


class GossipNode(LearningNode):
    """A node that mixes its model with its neighbours' and trains locally.

    Subclasses implement ``combine`` and may extend the state (``init_extra``, ``load_extra``,
    ``save_extra``), the local training (``train_locally``) and the update under ``cta``
    (``combine_with_step``).
    """

    def combine(self, models: list[StateDict], weights: Tensor, gen: torch.Generator,
                metrics: dict[str, float]) -> StateDict:
        """Merge k models (own first) with mixing weights (k,); may add to ``metrics``."""
        raise NotImplementedError

    def combine_with_step(self, models: list[StateDict], weights: Tensor, step: StateDict,
                          gen: torch.Generator, metrics: dict[str, float]) -> StateDict:
        """``cta``: the merge plus this node's local update ``step`` (primal by default)."""
        merged = self.combine(models, weights, gen, metrics)
        return {k: v + step[k] for k, v in merged.items()}

    def init_extra(self) -> dict[str, StateDict]:
        return {}

    def load_extra(self, state: NodeState) -> None:
        """Load algorithm-specific state before a round-trip."""

    def save_extra(self) -> dict[str, StateDict]:
        return {}

    def init_state(self) -> NodeState:
        return NodeState(0, {"shared": clone_tensors(self.initial_model), "optimizer": {},
                             **self.init_extra()})

    def round_trip(self, state: NodeState, task: NodeTask,
                   neighbours: Mapping[int, StateDict], gen: torch.Generator
                   ) -> tuple[NodeState, dict[str, float]]:
        # the shared tensors are the model, plus what an algorithm routes with it
        self.model.load_state_dict({k: state.shared[k] for k in self.initial_model})
        load_optimizer_state(self.optimizer, state.tensors["optimizer"])
        self.load_extra(state)
        task, metrics = self.screen(state, task, neighbours)
        models = [state.shared] + [neighbours[j] for j in task.neighbours]
        weights = torch.tensor((task.self_weight,) + task.weights)

        if self.config.order == "atc":
            self.model.load_state_dict(self.combine(models, weights, gen, metrics))
            metrics["accuracy"], metrics["loss"] = evaluate(self.model, self.data.test)
            if task.train:
                metrics["train_loss"] = self.train_locally(gen)
        else:
            metrics["accuracy"], metrics["loss"] = evaluate(self.model, self.data.test)
            if task.train:
                metrics["train_loss"] = self.train_locally(gen)
                step = {k: v - state.shared[k] for k, v in self.model.state_dict().items()}
                self.model.load_state_dict(
                    self.combine_with_step(models, weights, step, gen, metrics))

        tensors = {"shared": clone_tensors(self.model.state_dict()),
                   "optimizer": optimizer_state(self.optimizer), **self.save_extra()}
        return NodeState(task.round, tensors), metrics


def screen_and_log(own: StateDict, task: NodeTask, neighbours: Mapping[int, StateDict],
                   config: RunConfig, partition_id: int) -> tuple[NodeTask, dict[str, float]]:
    """``screen_neighbours`` with one warning per round-trip naming each dropped neighbour and
    why; the task to use and the metrics ``neighbours`` / ``neighbours_dropped``."""
    task, dropped = screen_neighbours(own, task, neighbours, config.max_neighbour_ratio)
    if dropped:
        log.warning("round-trip %s.%s: partition %s dropped neighbours %s", task.round,
                    task.stage, partition_id,
                    "; ".join(f"{j}: {reason}" for j, reason in dropped.items()))
    return task, {"neighbours": float(len(task.neighbours)),
                  "neighbours_dropped": float(len(dropped))}


def mix_row(task: NodeTask, own: StateDict, neighbours: Mapping[int, StateDict]) -> StateDict:
    """Row i of W times the stacked vectors: a_ii own + sum_j a_ij neighbour_j (tensorwise)."""
    return {key: task.self_weight * value + sum(w * neighbours[j][key]
                                                for j, w in zip(task.neighbours, task.weights))
            for key, value in own.items()}


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
        sizes = [models[0][n].numel() for n in names]
        stacked = models[0][names[0]].new_empty(len(models), sum(sizes))
        for row, model in zip(stacked, models):  # one copy of each model, no temporaries
            torch.cat([model[n].reshape(-1) for n in names], out=row)
        flat = power_mean(stacked, weights, degrees[group])
        for name, chunk in zip(names, flat.split(sizes)):
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


def clone_tensors(tensors: StateDict) -> StateDict:
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
