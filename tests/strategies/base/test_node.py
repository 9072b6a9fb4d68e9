"""Node rules keep nothing between round-trips: one rule object may serve any state."""

from __future__ import annotations

import pytest
import torch

from tests.variants import VARIANTS, make_config, nodes_for, spread_states


def run(plan, rules, states, decoys=None) -> dict:
    """Two rounds of round-trips; with ``decoys``, partition 0's rule first does a round-trip
    on a decoy state each time (its result thrown away)."""
    for round_, stage in plan.schedule():
        if round_ > 2:
            break
        latest = {p: s.shared for p, s in states.items()}
        for pid, task in plan.plan_round(round_, latest, stage).items():
            neighbours = {j: latest[j] for j in task.neighbours}
            if decoys is not None and pid == 0:
                rules[0].step(decoys[0], task, neighbours)
            states[pid] = rules[pid].step(states[pid], task, neighbours).state
    return states


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_round_trip_on_another_state_in_between_changes_nothing(tmp_path, variant):
    config = make_config(tmp_path, variant, num_nodes=3, density=1.0)
    plan, rules = nodes_for(config)
    straight = run(plan, rules, spread_states(rules, seed=1))
    plan, rules = nodes_for(config)
    interleaved = run(plan, rules, spread_states(rules, seed=1),
                      decoys=spread_states(rules, seed=9))
    for pid in straight:
        assert straight[pid].tensors.keys() == interleaved[pid].tensors.keys()
        for group, tensors in straight[pid].tensors.items():
            for name, value in tensors.items():
                assert torch.equal(value, interleaved[pid].tensors[group][name]), (group, name)
