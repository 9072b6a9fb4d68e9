"""What a node is told each round-trip (``NodeTask``), what it keeps (``NodeState``) and the
interface of an algorithm's node update (``NodeRule``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from flwr_hyperprism.math.merge import StateDict as StateDict  # re-exported: the nodes use it


@dataclass(frozen=True)
class NodeTask:
    """What the orchestrator tells one node for one round (all ids are partition ids)."""

    round: int  # round-trip index t >= 1; its merge completes round t - 1
    neighbours: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()  # a_ij, aligned with neighbours
    self_weight: float = 1.0  # a_ii
    train: bool = True  # False in the final round-trip: merge and evaluate only
    coefficients: Mapping[str, float] = field(default_factory=dict)  # algorithm constants
    stage: int = 0  # round-trip within the round (0: the evaluating one; see ``stages``)

    def without(self, dropped: Iterable[int]) -> NodeTask:
        """This task with some neighbours left out; their weight goes to the node itself, so
        the row sum (1 for averaging weights, 0 for a Laplacian) is unchanged."""
        gone = set(dropped)
        keep = [(j, w) for j, w in zip(self.neighbours, self.weights) if j not in gone]
        self_weight = self.self_weight + sum(w for j, w in zip(self.neighbours, self.weights)
                                             if j in gone)
        return dataclasses.replace(self, neighbours=tuple(j for j, _ in keep),
                                   weights=tuple(w for _, w in keep), self_weight=self_weight)


@dataclass
class NodeState:
    """A node's persistent state: named groups of tensors.

    The ``shared`` group is what the node sends its neighbours each round: its model for the
    gossip algorithms, other vectors for algorithms such as ADOM+.
    """

    round: int = 0
    tensors: dict[str, StateDict] = field(default_factory=dict)

    @property
    def shared(self) -> StateDict:
        return self.tensors["shared"]

    def to(self, device: torch.device) -> NodeState:
        """This state with every tensor on ``device`` (the same tensors where they are)."""
        return NodeState(self.round, {group: {k: v.to(device) for k, v in tensors.items()}
                                      for group, tensors in self.tensors.items()})


class Outcome(NamedTuple):
    """What a node's round-trip gives: its new state, the scalar metrics of the model it
    evaluated, and that model (None when the round-trip evaluated none, e.g. Mudag's mixing
    stages)."""

    state: NodeState
    metrics: dict[str, float]
    evaluated: StateDict | None


class NodeRule(Protocol):
    """An algorithm's node update; pure torch, no Flower."""

    def init_state(self) -> NodeState: ...

    def restore(self, shared: StateDict) -> NodeState:
        """The state of a node that lost its own and has only the ``shared`` tensors it last
        sent (the orchestrator keeps them): those, and the rest of ``init_state()``."""
        ...

    def step(self, state: NodeState, task: NodeTask,
             neighbour_models: Mapping[int, StateDict]) -> Outcome:
        """One round-trip from ``state``: the new state, the metrics and the evaluated model.
        A rule keeps nothing between round-trips, so one rule object may serve them all."""
        ...
