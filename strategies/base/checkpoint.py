"""Node checkpoints that let a run survive its processes: each node's state, written after
every round-trip (pure torch, no Flower; the orchestrator's own checkpoint is
``flwr_hyperprism.orchestration.store.RoutingCheckpoint``).

- ``NodeCheckpoints`` (``<state dir>/<run key>/partition-<id>/``): a node's ``NodeState`` after
  each of its round-trips (the newest ``keep`` files). A node that restarts, or every node of a
  resumed run, reloads the newest one from before the round-trip it is asked to do.
- ``starting_state``: which state a node starts a round-trip from (memory, its checkpoint, the
  shared tensors the orchestrator last routed for it, or the initial state).

Files are written to a temporary name and renamed, so a process killed mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .rule import NodeState, NodeTask, StateDict

log = logging.getLogger("flwr")

Position = tuple[int, int]  # (round, stage) of a round-trip; tuples order them in time


def save_atomically(payload: object, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)


class NodeCheckpoints:
    """A node's state after each round-trip under ``<state_dir>/<run_key>/partition-<id>/``.

    Parameters
    ----------
    state_dir : the node's state directory (absolute)
    run_key : the run's key (the orchestrator's ``RunStore.run_key``): runs never share
        checkpoints
    partition_id : the node's partition
    keep : how many of the newest checkpoints to keep
    """

    def __init__(self, state_dir: str | Path, run_key: str, partition_id: int,
                 keep: int = 2) -> None:
        if not re.fullmatch(r"[\w.=-]+", run_key):  # '=': a sweep cell's "alpha=0.1"
            raise ValueError(f"run key {run_key!r} is not a plain file name")
        self.directory = Path(state_dir) / run_key / f"partition-{partition_id}"
        self.keep = keep

    def _files(self) -> list[tuple[Position, Path]]:
        found = []
        if self.directory.is_dir():
            for path in self.directory.glob("r*-s*.pt"):
                match = re.fullmatch(r"r(\d+)-s(\d+)\.pt", path.name)
                if match:
                    found.append(((int(match[1]), int(match[2])), path))
        return sorted(found)

    def save(self, state: NodeState, stage: int) -> None:
        """Store ``state``, the result of round-trip (``state.round``, ``stage``)."""
        save_atomically({"round": state.round, "tensors": state.tensors},
                        self.directory / f"r{state.round:06d}-s{stage:03d}.pt")
        for _, path in self._files()[:-self.keep]:
            path.unlink(missing_ok=True)

    def latest_before(self, position: Position) -> tuple[NodeState, Position] | None:
        """The newest state from a round-trip before ``position``, with its position."""
        earlier = [(pos, path) for pos, path in self._files() if pos < position]
        if not earlier:
            return None
        pos, path = earlier[-1]
        saved = torch.load(path, weights_only=True)
        return NodeState(int(saved["round"]), saved["tensors"]), pos


def starting_state(task: NodeTask, held: NodeState | None,
                   checkpoints: NodeCheckpoints | None, routed_own: StateDict | None,
                   init: Callable[[], NodeState], restore: Callable[[StateDict], NodeState],
                   partition_id: int) -> NodeState:
    """The state a node starts round-trip ``task`` from, in this order of preference.

    1. ``held``: the state the node holds in memory (its previous round-trip);
    2. its newest checkpoint from before this round-trip (a restarted node, a resumed run);
    3. ``restore(routed_own)``: the shared tensors the orchestrator last routed for this
       partition (sent after the node missed round-trips or the partition moved to a new
       node); the rest of the state (optimizer, hypernetwork, ...) starts afresh;
    4. ``init()``: the initial state (the node's first round-trip).
    """
    if held is not None:
        return held
    if checkpoints is not None:
        found = checkpoints.latest_before((task.round, task.stage))
        if found is not None:
            state, (round_, stage) = found
            log.warning("partition %s resumes from its checkpoint of round %s%s in %s",
                        partition_id, round_, f" exchange {stage + 1}" if stage else "",
                        checkpoints.directory)
            return state
    if routed_own is not None:
        log.warning("partition %s has no state of its own: it restarts from the model the "
                    "orchestrator last routed for it (before round %s)", partition_id,
                    task.round)
        return restore(routed_own)
    return init()


def node_checkpoints(node_config: Mapping[str, object], run_state_dir: str, run_key: str,
                     partition_id: int) -> NodeCheckpoints | None:
    """The node's checkpoints: node config ``state-dir`` first, then the run config's."""
    state_dir = str(node_config.get("state-dir", "") or run_state_dir)
    if not state_dir or not run_key:
        return None
    return NodeCheckpoints(Path(state_dir).expanduser(), run_key, partition_id)
