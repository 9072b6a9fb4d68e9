"""One invariant battery over every algorithm (plan + node rule driven in-process):
invariants I4-I7 of tests/README.md."""

from __future__ import annotations

import math

import pytest
import torch

from flwr_hyperprism.math.mirror import sign_power
from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.rounds import round_loop
from strategies.base.rule import NodeTask
from tests.variants import (
    VARIANTS,
    conserved_degree,
    drive,
    make_config,
    nodes_for,
    spread_states,
)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if conserved_degree(v) is not None])
def test_zero_learning_rate_conserves_the_network_mirror_average(tmp_path, variant,
                                                                 zero_learning_rate):
    # Sum_i s_p(w_i) is conserved by a doubly stochastic merge (p = 1: the network average).
    p = conserved_degree(variant)
    config = make_config(tmp_path, variant, topology="ring")
    strategy, rules = nodes_for(config)
    history = drive(strategy, rules, spread_states(rules), rounds=3)
    scale = history[0].abs().amax(0)
    mass = sign_power(history[0] / scale, p).sum(0)
    for models in history[1:]:
        torch.testing.assert_close(sign_power(models / scale, p).sum(0), mass, rtol=0,
                                   atol=1e-5)
    assert not torch.equal(history[-1], history[0])  # something was mixed


@pytest.mark.parametrize("variant", VARIANTS)
def test_identical_models_stay_identical_without_learning(tmp_path, variant,
                                                          zero_learning_rate):
    config = make_config(tmp_path, variant)
    strategy, rules = nodes_for(config)
    history = drive(strategy, rules, spread_states(rules, identical=True), rounds=2)
    torch.testing.assert_close(history[-1], history[-1][0].expand_as(history[-1]), rtol=1e-6,
                               atol=1e-7)
    if config.algorithm != "adom":  # gossip: consensus is a fixed point (ADOM+ still moves,
        # its nu-terms act without gradients, but every node moves alike)
        torch.testing.assert_close(history[-1], history[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_nodes_give_finite_models_and_metrics(tmp_path, variant):
    config = make_config(tmp_path, variant, num_nodes=2)
    rows = run_in_process(round_loop(config))
    for row in rows:
        assert row["nodes_replied"] == config.num_nodes
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float))


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_are_deterministic_under_a_seed(tmp_path, variant):
    config = make_config(tmp_path, variant)

    def rows() -> list[dict]:
        result = run_in_process(round_loop(config))
        return [{k: v for k, v in row.items() if k != "seconds"} for row in result]

    assert rows() == rows()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_node_without_neighbours_keeps_training_alone(tmp_path, variant):
    config = make_config(tmp_path, variant, num_nodes=2)
    strategy, rules = nodes_for(config)
    state = rules[0].init_state()
    task = NodeTask(1, coefficients=strategy.coefficients(1))
    after, metrics, _ = rules[0].step(state, task, {})
    assert metrics["neighbours"] == 0.0 and "train_loss" in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(after.shared[k], v) for k, v in state.shared.items())
    assert all(bool(torch.isfinite(v).all()) for g in after.tensors.values() for v in g.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_node_groups_give_the_per_node_metrics(tmp_path, variant):
    # One epoch per round (unequal step counts: 2 to 20 minibatches of 400), momentum, the
    # whole evaluation set. The two paths round differently (one wide product against many
    # narrow ones), so they agree to
    # float tolerance: loss to 1e-4 relative; accuracy to 5e-4, i.e. up to 15 of the 6 nodes'
    # 30,000 test predictions: a near-tie's argmax flips under any rounding (ADOM's first
    # models, barely off the all-zero start, flip 8).
    rows = {}
    for batched in (False, True):
        config = make_config(tmp_path, variant, num_rounds=5, local_steps=0, batch_size=400,
                             momentum=0.5, eval_size=0, node_batching=batched,
                             run_name=f"{variant}-{batched}", mudag_max_gossip=2)
        rows[batched] = run_in_process(round_loop(config))
    assert len(rows[True]) == len(rows[False]) == 6
    for per_node, batched in zip(rows[False], rows[True]):
        assert batched["nodes_replied"] == per_node["nodes_replied"]
        assert math.isclose(batched["accuracy_mean"], per_node["accuracy_mean"], rel_tol=0,
                            abs_tol=5e-4)
        assert math.isclose(batched["loss_mean"], per_node["loss_mean"], rel_tol=1e-4)
