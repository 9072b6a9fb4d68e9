"""Node checkpoints: the newest few are kept, and a node starts a round-trip from what it
holds, else its checkpoint, else its routed model, else the initial state."""

from __future__ import annotations

import pytest
import torch

from strategies import NodeState, NodeTask
from strategies.base.checkpoint import NodeCheckpoints, node_checkpoints, starting_state


def state(round_: int, value: float) -> NodeState:
    return NodeState(round_, {"shared": {"w": torch.full((2,), value)}})


def test_the_newest_checkpoints_are_kept_and_found_before_a_position(tmp_path):
    saver = NodeCheckpoints(tmp_path, "run-1", 3, keep=2)
    for round_ in (1, 2, 3):
        saver.save(state(round_, float(round_)), stage=0)
    assert len(list(saver.directory.iterdir())) == 2
    found = saver.latest_before((3, 0))
    assert found is not None and found[1] == (2, 0) and found[0].round == 2
    assert saver.latest_before((2, 0)) is None  # round 1's file is gone
    with pytest.raises(ValueError, match="not a plain file name"):
        NodeCheckpoints(tmp_path, "../elsewhere", 3)
    assert NodeCheckpoints(tmp_path, "D-PSGD__alpha=0.1__seed0-0123abcd", 3).directory.parent \
        == tmp_path / "D-PSGD__alpha=0.1__seed0-0123abcd"  # a sweep cell's run name


def test_a_node_starts_from_memory_then_checkpoint_then_routed_model_then_afresh(tmp_path):
    saver = NodeCheckpoints(tmp_path, "run-1", 0)
    saver.save(state(1, 1.0), stage=0)
    task = NodeTask(2)
    init = lambda: state(0, 0.0)  # noqa: E731
    restore = lambda shared: NodeState(0, {"shared": shared})  # noqa: E731
    held = state(1, 5.0)
    assert starting_state(task, held, saver, None, init, restore, 0) is held
    assert starting_state(task, None, saver, None, init, restore, 0).round == 1
    routed = {"w": torch.full((2,), 7.0)}
    assert starting_state(task, None, None, routed, init, restore, 0).shared is routed
    assert starting_state(task, None, None, None, init, restore, 0).round == 0


def test_a_supernodes_state_dir_takes_precedence_over_the_run_configs(tmp_path):
    mine = node_checkpoints({"state-dir": str(tmp_path / "node")}, str(tmp_path / "run"), "k", 1)
    assert mine is not None and mine.directory == tmp_path / "node" / "k" / "partition-1"
    assert node_checkpoints({}, "", "k", 1) is None and node_checkpoints({}, "/x", "", 1) is None
