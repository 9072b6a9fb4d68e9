"""Decentralized strategies: one module per algorithm (orchestration + node rule)."""

from collections.abc import Callable

from flwr_hyperprism.config import RunConfig

from .adom import ADOM, ADOMNode
from .decentralized import (
    DecentralizedStrategy,
    NodeRule,
    NodeState,
    NodeTask,
    run_in_process,
    wait_for_partitions,
)
from .dpsgd import DPSGD, DPSGDNode
from .hyperprism import HyperPrism, HyperPrismNode
from .mudag import Mudag, MudagNode
from .swarmsgd import SwarmSGD, SwarmSGDNode

# algorithm name -> (orchestrator class, node rule factory)
ALGORITHMS: dict[str, tuple[type[DecentralizedStrategy], Callable[[RunConfig, int], NodeRule]]] = {
    cls.algorithm: (cls, node.for_partition)
    for cls, node in ((HyperPrism, HyperPrismNode), (DPSGD, DPSGDNode), (SwarmSGD, SwarmSGDNode),
                      (Mudag, MudagNode), (ADOM, ADOMNode))
}



def ignored_keys(algorithm: str) -> set[str]:
    """The RunConfig fields ``algorithm`` does not read: the other algorithms' own keys."""
    own = set(ALGORITHMS[algorithm][0].config_keys)
    return {key for cls, _ in ALGORITHMS.values() for key in cls.config_keys} - own


__all__ = [
    "ADOM", "ADOMNode", "ALGORITHMS", "DPSGD", "DPSGDNode", "DecentralizedStrategy",
    "HyperPrism", "HyperPrismNode", "Mudag", "MudagNode", "NodeRule", "NodeState", "NodeTask",
    "SwarmSGD", "SwarmSGDNode", "ignored_keys", "run_in_process", "wait_for_partitions",
]
