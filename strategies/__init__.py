"""Decentralized strategies: one module per algorithm (orchestration + node rule)."""

from collections.abc import Callable

from flwr_hyperprism.config import RunConfig

from .decentralized import (
    DecentralizedStrategy, NodeRule, NodeState, NodeTask, run_in_process, wait_for_partitions,
)
from .hyperprism import HyperPrism, HyperPrismNode

# algorithm name -> (orchestrator class, node rule factory)
ALGORITHMS: dict[str, tuple[type[DecentralizedStrategy], Callable[[RunConfig, int], NodeRule]]] = {
    HyperPrism.algorithm: (HyperPrism, HyperPrismNode.for_partition),
}

__all__ = [
    "ALGORITHMS", "DecentralizedStrategy", "HyperPrism", "HyperPrismNode", "NodeRule",
    "NodeState", "NodeTask", "run_in_process", "wait_for_partitions",
]
