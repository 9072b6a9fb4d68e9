"""ADOM+: gossip-matrix tasks and its behaviour without gradients."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.math.graphs import gossip_matrix
from flwr_hyperprism.setup.config import RunConfig
from strategies import ALGORITHMS
from strategies.adom import ADOM_VECTORS
from tests.variants import drive, make_config, nodes_for, spread_states


def test_adom_tasks_carry_gossip_matrix_rows_and_chi():
    config = RunConfig(num_nodes=12, algorithm="adom")
    strategy = ALGORITHMS["adom"].plan(config)
    assert strategy.chi >= 1.0
    task = strategy.plan_round(1, range(12))[0]
    assert task.coefficients == {"chi": strategy.chi}
    row = gossip_matrix(strategy.graphs.at(1))[0]
    assert task.self_weight == row[0] and task.weights == tuple(row[list(task.neighbours)])
    assert task.self_weight + sum(task.weights) == pytest.approx(0.0, abs=1e-12)


def test_adom_with_zero_gradients_and_zero_init_stays_at_zero(tmp_path, zero_learning_rate):
    # Without gradients, ADOM+ started at zero stays at zero.
    config = make_config(tmp_path, "adom")
    strategy, rules = nodes_for(config)
    states = {pid: rule.init_state() for pid, rule in rules.items()}
    for state in states.values():
        state.tensors["x"] = {k: torch.zeros_like(v) for k, v in state.tensors["x"].items()}
        state.tensors["x_f"] = {k: v.clone() for k, v in state.tensors["x"].items()}
    drive(strategy, rules, states, rounds=3)
    for state in states.values():
        assert state.round == 3
        for name in ADOM_VECTORS + ("shared",):
            assert all(not v.any() for v in state.tensors[name].values()), name


def test_adom_without_gradients_shrinks_a_consensus_model_by_one_factor(tmp_path,
                                                                          zero_learning_rate):
    # Why ADOM+ stays at chance on LeNet (RESULTS.md, "CNN baselines"): its update, built for
    # mu-strongly convex losses, pulls the model towards zero where the loss is flat, every
    # weight by the same factor, until its dual variable catches up; five layers shrunk in
    # series give constant logits, whose gradients vanish.
    config = make_config(tmp_path, "adom", num_rounds=20)
    strategy, rules = nodes_for(config)
    states = spread_states(rules, identical=True)  # one common random model: a consensus
    history = drive(strategy, rules, states, rounds=20)
    factors = [(model / history[0]) for model in history[1:]]
    for factor in factors:  # one factor for every weight of every node
        assert torch.allclose(factor, factor[0, 0].expand_as(factor), rtol=1e-6)
    shrink = [float(factor[0, 0]) for factor in factors]
    assert all(later < earlier for earlier, later in zip([1.0, *shrink], shrink))
    assert shrink[-1] < 0.25  # 0.20 at chi = 1, as LeNet's layers in a 2-node run
