"""The node rules' shared machinery: a node that gossips models, a node driven by gradients.

A node rule decides what a node merges, when it trains and what it keeps between round-trips;
its ``Learner`` (``strategies.base.learner``) does the training and evaluation, natively on the
node's own model and data, in plug-in mode through the user's train handler.

``GossipNode`` mixes its model with its neighbours' and trains locally; the gossip algorithms
subclass it and define how models are combined. Two orders (config ``order``):

- ``atc`` (adapt then combine, the paper's Algorithm 1; default): in round-trip t the node
  combines its neighbours' freshly trained models with its own, evaluates the result (the model
  after round t-1) and trains it locally.
- ``cta`` (combine then adapt, Lian et al.'s D-PSGD): the node evaluates its own model (the model
  after round t-1), computes a local update from it, and applies that update to the combination
  of its own and its neighbours' models: w_i <- combine_j(w_j) + update_i(w_i).

``GradientNode`` runs a ``GradientMethod`` (Mudag, ADOM+), which needs only gradients at points
it chooses.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar, cast

import torch
from torch import Tensor

from flwr_hyperprism.math.models import DECISION, REPRESENTATION
from flwr_hyperprism.math.seeding import round_seed
from flwr_hyperprism.setup.config import RunConfig

from .learner import DataLearner, Learner, LocalUpdate, clone_tensors, node_data, to_device
from .rule import NodeState, NodeTask, Outcome, StateDict
from .screening import divergence_fault, nonfinite_fault, screen_neighbours

log = logging.getLogger("flwr")

LINEAR = {REPRESENTATION: 1.0, DECISION: 1.0}  # p = 1 for both layer groups: plain averaging


@dataclass(frozen=True)
class Pending:
    """A round-trip waiting for its local training.

    Attributes
    ----------
    train_from : the model the learner trains (every key of its ``initial_model``); None when
        the round-trip trains nothing
    gen : the round's generator, which the training draws its minibatches from
    finish : the rest of the round-trip, given the learner's update of ``train_from`` (None
        when nothing was trained); its ``Outcome`` has no evaluation metrics yet: whoever
        steps the node evaluates ``Outcome.evaluated`` (``LearningNode.step``, a node group)
    """

    train_from: StateDict | None
    gen: torch.Generator
    finish: Callable[[LocalUpdate | None], Outcome]


def on_cpu(outcome: Outcome) -> Outcome:
    """``outcome`` with its state and evaluated model on the CPU."""
    cpu = torch.device("cpu")
    return Outcome(outcome.state.to(cpu), outcome.metrics, None if outcome.evaluated is None
                   else to_device(outcome.evaluated, cpu))


class LearningNode:
    """A node rule of one partition around its ``Learner``.

    Stateless itself (the state lives in ``NodeState``); subclasses define ``init_state`` and
    ``begin`` (a round-trip up to its local training; ``Pending.finish`` ends it). ``step``
    runs a round-trip single-threaded with the round's generator.
    """

    # the state groups that hold the node's model, the evaluated one first
    model_groups: ClassVar[tuple[str, ...]] = ("shared",)

    @classmethod
    def conserved_degree(cls, config: RunConfig) -> float | None:
        """The degree p whose network mirror-space mass sum_i s_p(w_i) a round of this rule
        conserves without learning under doubly stochastic weights (p = 1: the network
        average); None when it conserves none. The test battery checks it."""
        return None

    def __init__(self, config: RunConfig, partition_id: int, learner: Learner) -> None:
        self.config, self.partition_id, self.learner = config, partition_id, learner

    @classmethod
    def for_partition(cls, config: RunConfig, partition_id: int) -> LearningNode:
        """The rule of ``partition_id`` with the native learner (its own model and data)."""
        return cls(config, partition_id, cls.native_learner(config, partition_id))

    @classmethod
    def native_learner(cls, config: RunConfig, partition_id: int) -> DataLearner:
        return DataLearner(config, node_data(config, partition_id))

    @property
    def groups(self) -> Mapping[str, list[str]]:
        return self.learner.groups

    def init_state(self) -> NodeState:
        raise NotImplementedError

    def restore(self, shared: StateDict) -> NodeState:
        """``init_state()`` with the node's last ``shared`` tensors (``NodeRule.restore``)."""
        state = self.init_state()
        return NodeState(state.round, {**state.tensors, "shared": clone_tensors(shared)})

    def begin(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
              gen: torch.Generator) -> Pending:
        """A round-trip up to its local training: what to train (``Pending.train_from``; None:
        nothing) and how the round-trip ends once trained (``Pending.finish``). A node group
        trains the pending models of all its nodes at once (``strategies.base.group``)."""
        raise NotImplementedError

    def generator(self, task: NodeTask) -> torch.Generator:
        """The round's random generator, seeded by (run seed, partition, round)."""
        return torch.Generator().manual_seed(round_seed(self.config.seed, self.partition_id,
                                                        task.round))

    def step(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict]
             ) -> Outcome:
        """One round-trip; ``neighbours`` maps partition ids to their shared tensors.

        ``begin``, the learner's local training, ``Pending.finish``, then the learner's
        evaluation of the model of the round (the metrics ``accuracy`` and ``loss``). Computes
        on the learner's device; the state and evaluated model it returns are on the CPU, where
        messages and checkpoints need them.
        """
        device = self.learner.device
        neighbours = {j: to_device(m, device) for j, m in neighbours.items()}
        # One thread: a node's arithmetic (and so every metric) is then identical in Flower's
        # actors and in-process, whatever the machine's core count.
        with intra_op_threads(1):
            pending = self.begin(state.to(device), task, neighbours, self.generator(task))
            outcome = pending.finish(None if pending.train_from is None
                                     else self.learner.train(pending.train_from, pending.gen))
            if outcome.evaluated is not None:
                outcome.metrics.update(self.learner.evaluate(outcome.evaluated))
        return on_cpu(outcome)

    def screen(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict]
               ) -> tuple[NodeTask, dict[str, float]]:
        """Leave out unusable neighbours (logged); the task to use and the first metrics."""
        task, metrics = screen_and_log(state.shared, task, neighbours, self.config,
                                       self.partition_id)
        if self.learner.num_examples is not None:
            metrics["num_examples"] = float(self.learner.num_examples)
        return task, metrics

    def report_divergence(self, task: NodeTask, fault: str, metrics: dict[str, float]) -> None:
        """Log a rolled-back round-trip and count it in the metric ``diverged``."""
        log.warning("round %s: partition %s diverged (%s); it keeps its model from before "
                    "this round-trip", task.round, self.partition_id, fault)
        metrics["diverged"] = 1.0

    def full_model(self, tensors: Mapping[str, Tensor]) -> StateDict:
        """The learner's model keys from ``tensors``, the rest (e.g. integer buffers) from
        the initial model."""
        initial = self.learner.initial_model
        return {k: tensors[k] if k in tensors else v for k, v in initial.items()}


Gradient = Callable[[StateDict], StateDict]
"""A stochastic gradient oracle: parameters in, the gradient of the local loss there out."""


class GradientMethod(Protocol):
    """A node update that needs only gradients at points it chooses (Mudag, ADOM+).

    Pure tensor arithmetic on parameter dicts: where the gradients come from is the learner's
    business.
    """

    def __init__(self, config: RunConfig) -> None: ...

    def init_state(self, x: StateDict) -> NodeState:
        """The state at the initial parameters ``x``."""
        ...

    def round_trip(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
                   gradient: Gradient) -> tuple[NodeState, StateDict | None]:
        """The new state and the parameters to evaluate in this round-trip (None: none)."""
        ...


class GradientNode(LearningNode):
    """A ``GradientMethod`` whose gradients and evaluations come from the learner."""

    method: ClassVar[type[GradientMethod]]

    def __init__(self, config: RunConfig, partition_id: int, learner: Learner) -> None:
        super().__init__(config, partition_id, learner)
        self.update = self.method(config)

    def init_state(self) -> NodeState:
        initial = self.learner.initial_model
        return self.update.init_state({n: initial[n].clone() for n in self.learner.names})

    def begin(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
              gen: torch.Generator) -> Pending:
        """The whole round-trip: the method asks the learner for the gradients it needs; no
        local training is left for ``finish``."""
        task, metrics = self.screen(state, task, neighbours)

        def gradient(params: StateDict) -> StateDict:
            reported, grad = self.learner.gradient(params, gen)
            metrics.update(reported)
            return grad

        new, evaluated = self.update.round_trip(state, task, neighbours, gradient)
        fault = next(filter(None, (nonfinite_fault(tensors) for tensors in new.tensors.values())),
                     None) or (nonfinite_fault(evaluated) if evaluated is not None else None)
        if fault is not None:  # keep the last state; its gradients' metrics may be NaN too
            self.report_divergence(task, fault, metrics)
            outcome = Outcome(NodeState(task.round, state.tensors),
                              {k: v for k, v in metrics.items() if math.isfinite(v)}, None)
        else:
            outcome = Outcome(new, metrics,
                              self.full_model(evaluated) if evaluated is not None else None)
        return Pending(None, gen, lambda _: outcome)


class NodeExtra(Protocol):
    """An algorithm's own node state, as a typed (frozen dataclass) value: what a node keeps
    between round-trips besides its model and its learner's state, plus the values the
    algorithm's hooks hand each other within one round-trip. It saves itself as state groups
    (``to_groups``); the node rule reads it back (``GossipNode.load_extra``)."""

    def to_groups(self) -> dict[str, StateDict]: ...


@dataclass(frozen=True)
class NoExtra:
    """The extra state of an algorithm that keeps none (D-PSGD, SwarmSGD, local)."""

    def to_groups(self) -> dict[str, StateDict]:
        return {}


Extra = TypeVar("Extra", bound=NodeExtra)


class GossipNode(LearningNode, Generic[Extra]):
    """A node that mixes its model with its neighbours' and trains locally.

    Subclasses implement ``combine`` and may keep their own state, a typed ``Extra`` value
    (``init_extra``, ``load_extra``; it saves itself), react to a local update (``trained``)
    or a divergence (``diverged``) and change the update under ``cta``
    (``combine_with_step``): each hook takes the round-trip's extra value and returns the
    new one, so a rule holds nothing between round-trips. The shared tensors are the model
    plus the ``riders``, vectors an algorithm routes with it (e.g. HyperPrism's gradient
    tracker, ``riders_of``).
    """

    riders: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def model_of(cls, shared: Mapping[str, Tensor]) -> StateDict:
        """The model in a node's shared tensors (without the riders)."""
        return {k: v for k, v in shared.items() if k not in cls.riders}

    def combine(self, models: list[StateDict], weights: Tensor, gen: torch.Generator,
                metrics: dict[str, float], extra: Extra) -> tuple[StateDict, Extra]:
        """Merge k models (own first) with mixing weights (k,); may add to ``metrics``.

        Returns the merged parameters (the learner's ``names``; other keys stay the node's)
        and the extra state after the merge.
        """
        raise NotImplementedError

    def combine_with_step(self, models: list[StateDict], weights: Tensor, step: StateDict,
                          gen: torch.Generator, metrics: dict[str, float], extra: Extra
                          ) -> tuple[StateDict, Extra]:
        """``cta``: the merge plus this node's local update ``step`` (primal by default)."""
        merged, extra = self.combine(models, weights, gen, metrics, extra)
        return {k: v + step[k] for k, v in merged.items()}, extra

    def trained(self, start: StateDict, update: LocalUpdate, extra: Extra) -> Extra:
        """The extra state after the learner trained ``start`` into ``update.model``."""
        return extra

    def diverged(self, extra: Extra) -> Extra:
        """The extra state when this round-trip's model diverged and was rolled back (e.g.
        HyperPrism makes its next merge linear)."""
        return extra

    def riders_of(self, extra: Extra) -> StateDict:
        """What is routed with the model after the round-trip (``riders``)."""
        return {}

    def init_extra(self) -> dict[str, StateDict]:
        """The state groups of a new node's extra state."""
        return {}

    def load_extra(self, state: NodeState, task: NodeTask) -> Extra:
        """The extra state in ``state``, for round-trip ``task`` (none by default)."""
        return cast(Extra, NoExtra())

    def init_state(self) -> NodeState:
        return NodeState(0, {"shared": clone_tensors(self.learner.initial_model),
                             **self.init_extra()})

    def begin(self, state: NodeState, task: NodeTask, neighbours: Mapping[int, StateDict],
              gen: torch.Generator) -> Pending:
        # the shared tensors are the model, plus what an algorithm routes with it
        own = self.full_model(state.shared)
        self.learner.load(state)
        extra = self.load_extra(state, task)
        task, metrics = self.screen(state, task, neighbours)
        models = [state.shared] + [neighbours[j] for j in task.neighbours]
        weights = torch.tensor((task.self_weight,) + task.weights, device=self.learner.device)
        atc = self.config.order == "atc"
        if atc:
            merged, extra = self.combine(models, weights, gen, metrics, extra)
            model = self.full_model({**own, **merged})
            fault = nonfinite_fault(model)
            if fault is not None:
                model, extra = self._roll_back(own, task, f"its merge: {fault}", metrics, extra)
        else:
            model = own
        evaluated = start = model

        def finish(update: LocalUpdate | None) -> Outcome:
            nonlocal model, extra
            if update is not None:
                fault = (divergence_fault(start, update.model, update.metrics,
                                          self.config.max_neighbour_ratio)
                         or self.learner.training_fault(update))
                if fault is not None:
                    # back to the model the node had before this round-trip, not to ``start``:
                    # a merge that training blew up may hold a neighbour's own blow-up, which
                    # passed its checks, and would carry it on
                    model, extra = self._roll_back(own, task, f"training: {fault}", metrics,
                                                   extra)
                else:
                    metrics.update(update.metrics)
                    extra = self.trained(start, update, extra)
                    model, extra = (update.model, extra) if atc else self._combined_with(
                        own, update, models, weights, task, gen, metrics, extra)
            shared = {**clone_tensors(model), **self.riders_of(extra)}
            tensors = {"shared": shared, **self.learner.save(), **extra.to_groups()}
            return Outcome(NodeState(task.round, tensors), metrics, evaluated)

        return Pending(start if task.train else None, gen, finish)

    def _combined_with(self, own: StateDict, update: LocalUpdate, models: list[StateDict],
                       weights: Tensor, task: NodeTask, gen: torch.Generator,
                       metrics: dict[str, float], extra: Extra) -> tuple[StateDict, Extra]:
        """``cta``: the merge of ``models`` plus the local update of ``own`` (the node's full
        model; ``combine_with_step``), or ``own`` if that is not finite (rolled back); the
        extra state after."""
        step = {k: v - own[k] for k, v in update.model.items()}
        merged, extra = self.combine_with_step(models, weights, step, gen, metrics, extra)
        model = self.full_model({**update.model, **merged})
        fault = nonfinite_fault(model)
        if fault is not None:
            model, extra = self._roll_back(own, task, f"its merge: {fault}", metrics, extra)
        return model, extra

    def _roll_back(self, own: StateDict, task: NodeTask, fault: str,
                   metrics: dict[str, float], extra: Extra) -> tuple[StateDict, Extra]:
        """A diverged round-trip: the node keeps ``own``, its model from before the round-trip
        (the last one that ended a healthy round-trip), restarts its learner's own state
        (momentum that diverged with the model), lets the algorithm react (``diverged``), logs
        it, and counts it in the metric ``diverged``."""
        self.report_divergence(task, fault, metrics)
        self.learner.load(NodeState())
        return own, self.diverged(extra)


def screen_and_log(own: StateDict, task: NodeTask, neighbours: Mapping[int, StateDict],
                   config: RunConfig, partition_id: int) -> tuple[NodeTask, dict[str, float]]:
    """``screen_neighbours`` with one warning per round-trip naming each dropped neighbour and
    why; the task to use and the metrics ``neighbours`` / ``neighbours_dropped``."""
    task, dropped = screen_neighbours(own, task, neighbours, config.max_neighbour_ratio)
    if dropped:
        log.warning("round %s%s: partition %s dropped neighbours %s", task.round,
                    f" exchange {task.stage + 1}" if task.stage else "", partition_id,
                    "; ".join(f"{j}: {reason}" for j, reason in dropped.items()))
    return task, {"neighbours": float(len(task.neighbours)),
                  "neighbours_dropped": float(len(dropped))}


def mix_row(task: NodeTask, own: StateDict, neighbours: Mapping[int, StateDict]) -> StateDict:
    """Row i of W times the stacked vectors: a_ii own + sum_j a_ij neighbour_j (tensorwise)."""
    return {key: task.self_weight * value + sum(w * neighbours[j][key]
                                                for j, w in zip(task.neighbours, task.weights))
            for key, value in own.items()}


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block (0: left as they are)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
