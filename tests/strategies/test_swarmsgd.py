"""SwarmSGD: random maximal matchings, pairwise averages."""

from __future__ import annotations

import dataclasses

import torch

from tests.variants import drive, make_config, nodes_for, spread_states


def test_swarmsgd_pairs_leave_with_identical_models_and_conserve_the_average(
        tmp_path, zero_learning_rate):
    config = make_config(tmp_path, "swarmsgd", num_nodes=8)
    strategy, rules = nodes_for(config)
    states = spread_states(rules)
    tasks = strategy.plan_round(1, range(8))
    history = drive(strategy, rules, states, rounds=1)
    pairs = {(i, t.neighbours[0]) for i, t in tasks.items() if t.neighbours}
    assert pairs and all((j, i) in pairs for i, j in pairs)
    for i, j in pairs:
        assert torch.equal(history[1][i], history[1][j])
        torch.testing.assert_close(history[1][i], (history[0][i] + history[0][j]) / 2)
    for i in set(range(8)) - {i for i, _ in pairs}:
        assert torch.equal(history[1][i], history[0][i])
    torch.testing.assert_close(history[1].sum(0), history[0].sum(0), rtol=1e-5, atol=1e-5)


def test_swarmsgd_matching_is_maximal_and_idle_nodes_do_not_train(tmp_path):
    config = make_config(tmp_path, "swarmsgd", num_nodes=9, num_rounds=3, swarm_unmatched="idle")
    strategy, _ = nodes_for(config)
    for round_ in (1, 2, 3):
        tasks = strategy.plan_round(round_, range(9))
        matched = {i for i, t in tasks.items() if t.neighbours}
        unmatched = set(range(9)) - matched
        assert all(not tasks[i].train for i in unmatched)
        assert all(tasks[i].train and tasks[i].weights == (0.5,) for i in matched)
        graph = strategy.graphs.at(round_)
        assert not any(i in unmatched and j in unmatched for i, j in graph.edges())
    partial = strategy.plan_round(1, [0, 1, 2])
    assert all(set(t.neighbours) <= {0, 1, 2} for t in partial.values())
    final = strategy.plan_round(config.num_rounds + 1, range(9))
    assert not any(t.train for t in final.values())
    assert dataclasses.replace(final[0], train=True).round == config.num_rounds + 1
