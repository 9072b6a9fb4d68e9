"""The routing plan: every round-trip's tasks, rows that keep their sum, the schedule."""

from __future__ import annotations

from flwr_hyperprism.setup.config import RunConfig
from strategies.dpsgd import DPSGD


def test_tasks_are_rows_of_the_mixing_matrix_and_missing_neighbours_weigh_at_home():
    plan = DPSGD(RunConfig(num_nodes=5, density=1.0))
    full = plan.plan_round(3, range(5))
    assert all(len(t.neighbours) == 4 and abs(t.self_weight + sum(t.weights) - 1) < 1e-12
               for t in full.values())
    partial = plan.plan_round(3, [0, 1, 2])
    assert partial[0].neighbours == (1, 2)
    assert abs(partial[0].self_weight - (full[0].self_weight + sum(full[0].weights[2:]))) < 1e-12


def test_the_schedule_has_one_round_trip_per_round_and_a_last_one_that_only_merges():
    plan = DPSGD(RunConfig(num_nodes=3, num_rounds=4))
    assert list(plan.schedule()) == [(r, 0) for r in range(1, 6)]
    assert all(t.train for t in plan.plan_round(4, range(3)).values())
    assert not any(t.train for t in plan.plan_round(5, range(3)).values())
