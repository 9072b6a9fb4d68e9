"""One invariant battery over every algorithm (plan + node rule driven in-process)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.graphs import fastmix_momentum, gossip_matrix
from flwr_hyperprism.mirror import sign_power
from flwr_hyperprism.server_app import initial_model
from strategies import ALGORITHMS
from strategies.adom import ADOM_VECTORS
from strategies.decentralized import make_strategy, run_in_process
from strategies.mudag import MudagNode
from tests.variants import MODEL_GROUPS, VARIANTS, make_config, nodes_for


def test_the_battery_covers_every_registered_algorithm():
    assert {algorithm for algorithm, _, _ in VARIANTS.values()} == set(ALGORITHMS)


def spread_states(rules, seed: int = 1, identical: bool = False) -> dict:
    """Initial states whose models are random (one common random model if ``identical``)."""
    gen = torch.Generator().manual_seed(seed)
    states = {}
    template = None
    for pid, rule in rules.items():
        state = rule.init_state()
        groups = MODEL_GROUPS.get(type(rule), ("shared",))
        if template is None or not identical:
            template = {k: torch.randn(v.shape, generator=gen)
                        for k, v in state.tensors[groups[0]].items()}
        for group in groups:
            state.tensors[group] = {k: v.clone() for k, v in template.items()}
        states[pid] = state
    return states


def drive(strategy, rules, states, rounds: int) -> list[torch.Tensor]:
    """Round-trips of rounds 1..rounds; the stacked, flattened models (float64) at the start
    and after the stage-0 round-trip of each round (for Mudag, round r's stage 0 completes
    round r - 1)."""
    group = MODEL_GROUPS.get(type(rules[0]), ("shared",))[0]
    names = list(rules[0].init_state().tensors[group])  # the model (not what rides with it)

    def stacked():
        return torch.stack([torch.cat([states[p].tensors[group][n].reshape(-1) for n in names])
                            for p in sorted(states)]).double()

    history = [stacked()]
    for round_, stage in strategy.schedule():
        if round_ > rounds:
            break
        latest = {p: s.shared for p, s in states.items()}
        for pid, task in strategy.plan_round(round_, latest, stage).items():
            states[pid], _ = rules[pid].step(states[pid], task,
                                             {j: latest[j] for j in task.neighbours})
        if stage == 0:
            history.append(stacked())
    return history


@pytest.mark.parametrize("variant", [v for v, (_, _, p) in VARIANTS.items() if p is not None])
def test_zero_learning_rate_conserves_the_network_mirror_average(tmp_path, variant,
                                                                 zero_learning_rate):
    # Sum_i s_p(w_i) is conserved by a doubly stochastic merge (p = 1: the network average).
    p = VARIANTS[variant][2]
    config = make_config(tmp_path, variant, topology="ring")
    strategy, rules = nodes_for(config)
    history = drive(strategy, rules, spread_states(rules), rounds=3)
    scale = history[0].abs().amax(0)
    mass = sign_power(history[0] / scale, p).sum(0)
    for models in history[1:]:
        torch.testing.assert_close(sign_power(models / scale, p).sum(0), mass, rtol=0,
                                   atol=1e-5)
    assert not torch.equal(history[-1], history[0])  # something was mixed


@pytest.mark.parametrize("variant", list(VARIANTS))
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


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("graph", [{"num_nodes": 2}, {"density": 1e-9}],
                         ids=["two-nodes", "no-edges"])
def test_degenerate_graphs_give_finite_models_and_metrics(tmp_path, variant, graph):
    config = make_config(tmp_path, variant, **graph)
    spec = ALGORITHMS[config.algorithm]
    strategy, make_rule = make_strategy, spec.make_rule
    rows = run_in_process(strategy(config), make_rule,
                          dict(initial_model(config).to_torch_state_dict()))
    for row in rows:
        assert row["nodes_replied"] == config.num_nodes
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_runs_are_deterministic_under_a_seed(tmp_path, variant):
    config = make_config(tmp_path, variant)

    def rows() -> list[dict]:
        spec = ALGORITHMS[config.algorithm]
        strategy, make_rule = make_strategy, spec.make_rule
        result = run_in_process(strategy(config), make_rule,
                                dict(initial_model(config).to_torch_state_dict()))
        return [{k: v for k, v in row.items() if k != "seconds"} for row in result]

    assert rows() == rows()


@pytest.mark.parametrize("order", ["atc", "cta"])
def test_hyperprism_with_fixed_p_1_is_dpsgd(tmp_path, order):
    # Bit for bit: the p = 1 merge is the same weighted mean in both.
    def rows(algorithm: str, **changes) -> list[dict]:
        config = RunConfig(num_nodes=5, num_rounds=3, local_steps=3, order=order,
                           algorithm=algorithm, **changes)
        spec = ALGORITHMS[algorithm]
        strategy, make_rule = make_strategy, spec.make_rule
        result = run_in_process(strategy(config), make_rule,
                                dict(initial_model(config).to_torch_state_dict()))
        drop = {"seconds", "p_theta", "p_phi", "p_theta_mean", "p_phi_mean", "p_theta_std",
                "p_phi_std"}
        return [{k: v for k, v in row.items() if k not in drop} for row in result]

    assert rows("hyperprism", p_mode="fixed", fixed_p=1.0) == rows("dpsgd")


def test_complete_graph_linear_gossip_reaches_consensus_in_one_round(tmp_path,
                                                                    zero_learning_rate):
    # MH weights on the complete graph are 1/m, so one merge averages everyone.
    config = make_config(tmp_path, "dpsgd", topology="complete")
    strategy, rules = nodes_for(config)
    history = drive(strategy, rules, spread_states(rules), rounds=1)
    torch.testing.assert_close(history[1], history[0].mean(0).expand_as(history[1]), rtol=1e-5,
                               atol=1e-6)


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


def test_adom_tasks_carry_gossip_matrix_rows_and_chi():
    config = RunConfig(num_nodes=12, algorithm="adom")
    strategy = ALGORITHMS["adom"].orchestrator(config)
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
            states[pid], _ = rules[pid].step(states[pid], task,
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
        for name in MODEL_GROUPS[MudagNode]:
            for k, v in state.tensors[name].items():
                torch.testing.assert_close(v, init[k], rtol=1e-6, atol=1e-7)


def test_mudag_rounds_take_k_exchanges_and_rows_count_them(tmp_path):
    config = make_config(tmp_path, "mudag", num_nodes=6, num_rounds=3, topology="ring")
    spec = ALGORITHMS["mudag"]
    plan = spec.orchestrator(config)
    steps = [plan.gossip_steps(t) for t in (1, 2, 3)]
    assert steps == [5, 5, 5]  # ring of 6: lambda2(Wm) = 3/4, K = ceil(ln 10 / (1/2))
    assert [plan.stages(t) for t in (1, 2, 3, 4)] == steps + [1]
    assert list(plan.schedule()) == [(t, s) for t in (1, 2, 3) for s in range(5)] + [(4, 0)]
    first = plan.plan_round(1, range(6))
    assert all(not t.neighbours and t.self_weight == 1.0 for t in first.values())
    rows = run_in_process(make_strategy(config), spec.make_rule,
                          dict(initial_model(config).to_torch_state_dict()))
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
