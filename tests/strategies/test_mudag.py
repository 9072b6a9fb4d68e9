"""Mudag: FastMix stages against a dense float64 reference, and its rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flwr_hyperprism.math.graphs import fastmix_momentum
from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.rounds import round_loop
from strategies import ALGORITHMS
from strategies.mudag import MudagNode
from tests.variants import drive, make_config, nodes_for, spread_states


def fastmix_reference(weights: np.ndarray, u: np.ndarray, eta: float, steps: int) -> np.ndarray:
    """Dense float64 FastMix: X_0 = X_-1 = U; X_k+1 = (1 + eta) W X_k - eta X_k-1."""
    current, previous = u, u
    for _ in range(steps):
        current, previous = (1 + eta) * weights @ current - eta * previous, current
    return current


@pytest.mark.parametrize("identical", [False, True], ids=["spread", "consensus"])
def test_mudag_fastmix_stages_match_the_dense_reference(tmp_path, identical):
    # FastMix keeps the node average, returns a consensus input unchanged, and
    # shrinks the disagreement as K grows (at the rate sqrt(14) (1 - sqrt(1 - lambda2))^K).
    config = make_config(tmp_path, "mudag", num_nodes=8, density=0.5)
    strategy, rules = nodes_for(config)
    states = spread_states(rules, identical=identical)
    u = torch.stack([torch.cat([v.reshape(-1) for v in states[p].shared.values()])
                     for p in range(8)]).double().numpy()
    weights = strategy.mixing_matrix(strategy.graphs.at(1))
    eta, steps = strategy.coefficients(1)["eta_w"], strategy.gossip_steps(1)
    lambda2 = np.linalg.eigvalsh(weights)[-2]
    assert lambda2 == pytest.approx(strategy.lambda2(1)) and steps == strategy.stages(1) > 1

    def disagreement(x: np.ndarray) -> float:
        return float(np.linalg.norm(x - x.mean(axis=0)))

    for k in range(1, 2 * steps + 1):
        latest = {p: s.shared for p, s in states.items()}
        for pid, task in strategy.plan_round(1, latest, stage=1).items():
            states[pid], _, _ = rules[pid].step(states[pid], task,
                                             {j: latest[j] for j in task.neighbours})
        mixed = torch.stack([torch.cat([v.reshape(-1) for v in states[p].shared.values()])
                             for p in range(8)]).double().numpy()
        np.testing.assert_allclose(mixed, fastmix_reference(weights, u, eta, k), atol=1e-5)
        np.testing.assert_allclose(mixed.mean(axis=0), u.mean(axis=0), atol=1e-5)
        if identical:
            np.testing.assert_allclose(mixed, u, atol=1e-6)
        else:
            bound = math.sqrt(14) * (1 - math.sqrt(1 - lambda2)) ** k * disagreement(u)
            assert disagreement(mixed) <= bound
    if not identical:
        assert (disagreement(fastmix_reference(weights, u, eta, 2 * steps))
                < disagreement(fastmix_reference(weights, u, eta, steps)) < disagreement(u))


def test_mudag_without_gradients_stays_at_its_consensus_init(tmp_path, zero_learning_rate):
    # Without gradients, Mudag stays at its consensus start, through every stage of every
    # round including the last.
    config = make_config(tmp_path, "mudag", num_rounds=3)
    strategy, rules = nodes_for(config)
    states = {pid: rule.init_state() for pid, rule in rules.items()}
    init = {k: v.clone() for k, v in states[0].tensors["x"].items()}
    history = drive(strategy, rules, states, rounds=config.num_rounds + 1)
    assert len(history) == config.num_rounds + 2
    for state in states.values():
        assert state.round == config.num_rounds + 1
        for name in MudagNode.model_groups:
            for k, v in state.tensors[name].items():
                torch.testing.assert_close(v, init[k], rtol=1e-6, atol=1e-7)


def test_mudag_rounds_take_k_exchanges_and_rows_count_them(tmp_path):
    config = make_config(tmp_path, "mudag", num_nodes=6, num_rounds=3, topology="ring")
    spec = ALGORITHMS["mudag"]
    plan = spec.plan(config)
    steps = [plan.gossip_steps(t) for t in (1, 2, 3)]
    assert steps == [5, 5, 5]  # ring of 6: lambda2(Wm) = 3/4, K = ceil(ln 10 / (1/2))
    assert [plan.stages(t) for t in (1, 2, 3, 4)] == steps + [1]
    assert list(plan.schedule()) == [(t, s) for t in (1, 2, 3) for s in range(5)] + [(4, 0)]
    first = plan.plan_round(1, range(6))
    assert all(not t.neighbours and t.self_weight == 1.0 for t in first.values())
    rows = run_in_process(round_loop(config))
    assert [row["exchanges"] for row in rows] == [0, 5, 10, 15]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]


@pytest.mark.parametrize(("graph", "steps", "eta_w"), [
    ({"num_nodes": 2}, 3, 0.0),  # Wm = all 1/2: lambda2 = 0, K = ceil(ln 10)
    ({"density": 1e-9, "mudag_max_gossip": 7}, 7, fastmix_momentum(1.0)),  # lambda2 = 1
], ids=["two-nodes", "no-edges"])
def test_mudag_degenerate_graphs_use_the_clamped_spectral_gap(tmp_path, graph, steps, eta_w):
    config = make_config(tmp_path, "mudag", **graph)
    strategy, _ = nodes_for(config)
    assert strategy.gossip_steps(1) == steps
    assert strategy.plan_round(1, range(config.num_nodes), 1)[0].coefficients == {
        "eta_w": pytest.approx(eta_w)}
