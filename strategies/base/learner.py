"""Where a node's training, gradients and evaluation come from: its ``Learner``.

A node rule (``strategies.base.node`` and the algorithm modules) decides what to merge, when to
train and what to keep; its learner does the learning. ``DataLearner`` is the native one: the
node's own model (``flwr_hyperprism.math.models``), its Dirichlet partition, local SGD and
the global test set. Plug-in mode's learner is the user's train handler
(``flwr_hyperprism.client.handler.HandlerLearner``), so every algorithm runs the same node rule
in both modes. Pure torch, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from flwr_hyperprism.math.models import DECISION, REPRESENTATION, build_model, layer_group
from flwr_hyperprism.math.seeding import round_rng
from flwr_hyperprism.math.sgd import MomentumSGD
from flwr_hyperprism.setup.config import RunConfig
from flwr_hyperprism.setup.data import (
    INPUT_SHAPES,
    NUM_CLASSES,
    Dataset,
    Split,
    dirichlet_partition,
    load_dataset,
)

from .rule import NodeState, StateDict

# Images per evaluation forward pass. Small enough that a conv block's activations stay in the
# CPU's cache: on this 2-core VM, 2000 Fashion-MNIST images take 0.18 s through LeNet and 1.4 s
# through the cnn in batches of 256, against 0.31 s and 2.3 s in one batch of 2048 (the logits
# were identical here; the loss is summed in another order).
EVAL_BATCH = 256


@dataclass(frozen=True)
class LocalUpdate:
    """What one local training of a model gives back.

    Attributes
    ----------
    model : the trained model (every key of the learner's ``initial_model``)
    metrics : what the training reports (natively ``train_loss``; a handler's own metrics)
    gradient : {parameter name: tensor}, an estimate of the local gradient: the last
        minibatch's gradient for the node's own SGD, the pseudo-gradient (start - trained) / lr
        for a train handler
    first_loss : the loss of the first minibatch, at the model the training started from
        (None: not known, e.g. a train handler)
    """

    model: StateDict
    metrics: dict[str, float]
    gradient: StateDict
    first_loss: float | None = None


class Learner(Protocol):
    """A node's model, training, gradients and evaluation, as the node rules use them."""

    @property
    def initial_model(self) -> StateDict:
        """The model a new node state starts from (all keys, integer buffers too)."""
        ...

    @property
    def names(self) -> tuple[str, ...]:
        """The floating-point parameters, in model order: what the algorithms merge."""
        ...

    @property
    def groups(self) -> Mapping[str, list[str]]:
        """{layer group: parameter names}, a partition of ``names`` (``theta`` / ``phi``)."""
        ...

    @property
    def num_examples(self) -> int | None:
        """The size of the node's training data, when the learner knows it."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the node rule computes (its state and messages stay on the CPU)."""
        ...

    def load(self, state: NodeState) -> None:
        """Take the learner's own state (e.g. optimizer momentum) from a node state; a state
        without it starts the learner afresh."""

    def save(self) -> dict[str, StateDict]:
        """The learner's own state, as node state groups."""
        ...

    def evaluate(self, model: StateDict) -> dict[str, float]:
        """Metrics of ``model`` after a merge (natively ``accuracy`` and ``loss``)."""
        ...

    def train(self, model: StateDict, gen: torch.Generator) -> LocalUpdate:
        """Train ``model`` locally (one round's worth)."""
        ...

    def training_fault(self, update: LocalUpdate) -> str | None:
        """Why a finite ``update`` of this learner's training has nevertheless diverged (its
        loss is out of all proportion), or None; non-finite and runaway models are the node
        rule's check (``screening.divergence_fault``)."""
        ...

    def gradient(self, params: StateDict, gen: torch.Generator
                 ) -> tuple[dict[str, float], StateDict]:
        """Metrics and a stochastic gradient of the local loss at ``params``."""
        ...

    def probe(self, model: StateDict, gen: torch.Generator) -> tuple[float, StateDict] | None:
        """Loss and gradient of a fresh minibatch at ``model``, before training; None when
        only training reveals a gradient (a train handler): the caller then uses
        ``LocalUpdate.gradient``."""
        ...


def resolve_device(name: str) -> torch.device:
    """The torch device of config ``device``: 'auto' is CUDA when present, else the CPU.

    Raises ValueError for a CUDA device this machine does not have, naming the fix.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device={name!r}, but this machine has {count} CUDA device(s) "
                             f"(torch.cuda.is_available() is {torch.cuda.is_available()}): "
                             f"use device='auto' or 'cpu'")
    return device


def to_device(tensors: Mapping[str, Tensor], device: torch.device) -> StateDict:
    """``tensors`` on ``device`` (the same tensors where they are there already)."""
    return {k: v.to(device) for k, v in tensors.items()}


def initial_model(config: RunConfig) -> StateDict:
    """The common initial model every node starts from (a function of model, dataset, seed)."""
    model = build_model(config.model, INPUT_SHAPES[config.dataset], NUM_CLASSES, config.seed)
    return clone_tensors(model.state_dict())


@dataclass(frozen=True)
class NodeData:
    train: Split  # this node's partition
    test: Split  # the global test set

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def dataset_in_memory(dataset: str, data_dir: str, download: bool, seed: int,
                      validation_fraction: float = 0.0) -> Dataset:
    """``load_dataset``, loaded once per process; ``seed`` only matters for 'synthetic' (files
    are the same for every seed, so runs with other seeds reuse the loaded copy).

    With ``validation_fraction`` > 0 a fixed seeded share of the training set is held out and
    takes the test set's place: the nodes train on the rest and are evaluated on the held-out
    share, so settings can be chosen without looking at the test set.
    """
    data = _loaded(dataset, data_dir, download, seed if dataset == "synthetic" else 0)
    if validation_fraction == 0.0:
        return data
    return _held_out(dataset, data_dir, download, seed, validation_fraction)


@lru_cache(maxsize=2)
def _loaded(dataset: str, data_dir: str, download: bool, seed: int) -> Dataset:
    return load_dataset(dataset, data_dir, download, seed)


@lru_cache(maxsize=2)
def _held_out(dataset: str, data_dir: str, download: bool, seed: int,
              validation_fraction: float) -> Dataset:
    train = dataset_in_memory(dataset, data_dir, download, seed).train
    order = torch.from_numpy(round_rng(seed, 0x7A11D).permutation(len(train)))
    cut = round(validation_fraction * len(train))
    rest, held = order[cut:].sort().values, order[:cut].sort().values
    return Dataset(Split(train.x[rest], train.y[rest]), Split(train.x[held], train.y[held]))


@lru_cache(maxsize=2)
def partitioned(dataset: str, data_dir: str, download: bool, seed: int, num_nodes: int,
                alpha: float, min_size: int, validation_fraction: float = 0.0
                ) -> tuple[Dataset, tuple[np.ndarray, ...]]:
    """The dataset (less its validation share) and its Dirichlet partition (one index array
    per node; cached per process)."""
    data = dataset_in_memory(dataset, data_dir, download, seed, validation_fraction)
    parts = dirichlet_partition(data.train.y.numpy(), num_nodes, alpha, seed, min_size)
    return data, tuple(parts)


def node_data(config: RunConfig, partition_id: int) -> NodeData:
    """The node's training partition and the evaluation set: the global test set, or with
    ``validation_fraction`` > 0 the validation share held out of the training set (both cached
    per process: every node of a process shares one evaluation set).

    With ``eval_size`` > 0 the evaluation set is a fixed random subset of that size (the same
    for every node and round), which makes per-round evaluation of CNNs affordable on CPUs.
    """
    if not 0 <= partition_id < config.num_nodes:
        raise ValueError(f"partition id {partition_id} is outside 0..{config.num_nodes - 1} "
                         f"(num-nodes={config.num_nodes})")
    data, parts = partitioned(config.dataset, config.data_dir, config.download, config.seed,
                              config.num_nodes, config.alpha, config.min_partition_size,
                              config.validation_fraction)
    idx = torch.from_numpy(parts[partition_id])
    test = evaluation_split(config.dataset, config.data_dir, config.download, config.seed,
                            config.eval_size, config.validation_fraction)
    return NodeData(Split(data.train.x[idx], data.train.y[idx]), test)


@lru_cache(maxsize=2)
def evaluation_split(dataset: str, data_dir: str, download: bool, seed: int,
                     eval_size: int, validation_fraction: float = 0.0) -> Split:
    """The dataset's test set (or its validation share, ``dataset_in_memory``), or its fixed
    random subset of ``eval_size`` images when 0 < eval_size < its size (cached: one copy per
    process, shared by its nodes)."""
    test = dataset_in_memory(dataset, data_dir, download, seed, validation_fraction).test
    if not 0 < eval_size < len(test):
        return test
    keep = torch.from_numpy(round_rng(seed, 0xE7A1).permutation(len(test))[:eval_size])
    return Split(test.x[keep], test.y[keep])


class DataLearner:
    """The native learner: the node's seeded model, SGD on its partition, the global test set.

    ``local_steps`` (default: ``config.local_steps``, else ``local_epochs`` passes) minibatch
    steps per ``train``. The optimizer's state is the node state group ``optimizer``. The
    model and the training partition live on ``config.device`` (``resolve_device``); the test
    set, shared by the process's nodes, stays on the CPU and goes to the device a batch at a
    time. Minibatch order comes from the round's CPU generator, so it is the same on every
    device.
    """

    def __init__(self, config: RunConfig, data: NodeData, local_steps: int = 0) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.data = NodeData(Split(data.train.x.to(self.device), data.train.y.to(self.device)),
                             data.test)
        self.model = build_model(config.model, data.input_shape, NUM_CLASSES,
                                 config.seed).to(self.device)
        # The model object is reused across round-trips (and runs, when the rule is cached):
        # a new state must start from the seeded initial weights, not from its current ones.
        self.initial_model = clone_tensors(self.model.state_dict())
        self.names = tuple(name for name, _ in self.model.named_parameters()
                           if not config.is_local(name))
        self.groups = {g: [n for n in self.names if layer_group(n) == g]
                       for g in (REPRESENTATION, DECISION)}
        self.num_examples = len(data.train)
        batches = -(-len(data.train) // config.batch_size)
        self.local_steps = local_steps or config.local_steps or config.local_epochs * batches
        self.optimizer = MomentumSGD(self.model.parameters(), config.lr, config.momentum)

    def load(self, state: NodeState) -> None:
        """The optimizer's state; a state without one (a new node) resets it."""
        self.optimizer.load_state(state.tensors.get("optimizer", {}))

    def save(self) -> dict[str, StateDict]:
        return {"optimizer": self.optimizer.state()}

    def evaluate(self, model: StateDict) -> dict[str, float]:
        self.model.load_state_dict(model)
        accuracy, loss = evaluate(self.model, self.data.test)
        return {"accuracy": accuracy, "loss": loss}

    def train(self, model: StateDict, gen: torch.Generator) -> LocalUpdate:
        """``local_steps`` SGD steps on shuffled minibatches; metric ``train_loss`` (mean)."""
        self.model.load_state_dict(model)
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
        last_gradient = {}
        for name, parameter in self.model.named_parameters():
            if name in self.names:
                grad = parameter.grad
                last_gradient[name] = (torch.zeros_like(parameter) if grad is None
                                       else grad.detach().clone())
        return LocalUpdate(clone_tensors(self.model.state_dict()),
                           {"train_loss": sum(losses) / len(losses)}, last_gradient, losses[0])

    def training_fault(self, update: LocalUpdate) -> str | None:
        """Diverged when the mean training loss exceeds ``max-train-loss-ratio`` times the
        larger of the first minibatch's loss (where the training started) and ln(classes),
        the cross-entropy of a uniform guess: training made the model far worse on the very
        data it trained on. A blow-up at a step size near the edge of stability can stay
        finite and under the growth limit (``divergence_fault``) and still spread through the
        merges. A node whose model starts bad may still train: only a rise counts."""
        ratio, loss = self.config.max_train_loss_ratio, update.metrics["train_loss"]
        start = max(update.first_loss or 0.0, math.log(NUM_CLASSES))
        if loss > ratio * start:
            return (f"train_loss {loss:.4g} > {ratio:g} x max(first minibatch's loss, "
                    f"ln {NUM_CLASSES}) = {ratio * start:.4g}")
        return None

    def gradient(self, params: StateDict, gen: torch.Generator
                 ) -> tuple[dict[str, float], StateDict]:
        """Gradient of one random minibatch (``batch-size``, without replacement)."""
        train = self.data.train
        idx = torch.randperm(len(train), generator=gen)[:self.config.batch_size]
        loss, grads = self._loss_gradient(params, train.x[idx], train.y[idx])
        return {"train_loss": loss}, grads

    def probe(self, model: StateDict, gen: torch.Generator) -> tuple[float, StateDict]:
        """Loss and gradient of ``min(batch-size, n)`` examples drawn with replacement."""
        train = self.data.train
        idx = torch.randint(len(train), (min(self.config.batch_size, len(train)),),
                            generator=gen)
        return self._loss_gradient(model, train.x[idx], train.y[idx])

    def _loss_gradient(self, params: StateDict, x: Tensor, y: Tensor
                       ) -> tuple[float, StateDict]:
        params = {k: p.detach().requires_grad_() for k, p in params.items()}
        loss = F.cross_entropy(functional_call(self.model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        return float(loss.detach()), dict(zip(params, grads))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, test: Split) -> tuple[float, float]:
    """Accuracy (fraction) and mean cross-entropy of ``model`` on a ``Split`` (wherever the
    split is: each batch goes to the model's device)."""
    device = next(model.parameters()).device
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(test), EVAL_BATCH):
        logits = model(test.x[start:start + EVAL_BATCH].to(device))
        labels = test.y[start:start + EVAL_BATCH].to(device)
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return correct / len(test), loss / len(test)


def clone_tensors(tensors: Mapping[str, Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in tensors.items()}
