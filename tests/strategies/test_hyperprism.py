"""HyperPrism's plan and node rule driven in-process, against dense references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flwr_hyperprism.math.degrees import scheduled_degree
from flwr_hyperprism.math.graphs import metropolis_hastings_weights
from flwr_hyperprism.math.merge import merge_models
from flwr_hyperprism.math.mirror import inverse_sign_power, sign_power
from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.rounds import round_loop
from flwr_hyperprism.setup.config import RunConfig
from strategies.hyperprism import TRACKER, HyperPrism, HyperPrismExtra, HyperPrismNode


def small_config(tmp_path, **changes) -> RunConfig:
    settings = {"num_nodes": 5, "num_rounds": 3, "output_dir": str(tmp_path), "run_name": "run",
                "p_mode": "hypernetwork"}  # the paper's degrees unless a test says otherwise
    return RunConfig.build(**{**settings, **changes})


def flat(model: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in model.values()]).double()


def spread_models(rules: dict, seed: int = 1) -> dict:
    """Node states whose models differ (so merging has something to do)."""
    gen = torch.Generator().manual_seed(seed)
    states = {}
    for pid, rule in rules.items():
        state = rule.init_state()
        state.tensors["shared"] = {k: torch.randn(v.shape, generator=gen)
                                  for k, v in state.shared.items()}
        states[pid] = state
    return states


def gossip_without_training(strategy, rules, states, rounds: int) -> list[torch.Tensor]:
    """Drive plan + node rule with train=False (learning rate 0); stacked models per round."""
    history = [torch.stack([flat(states[p].shared) for p in sorted(states)])]
    for round_ in range(1, rounds + 1):
        latest = {p: s.shared for p, s in states.items()}
        for pid, task in strategy.plan_round(round_, latest).items():
            states[pid], _, _ = rules[pid].step(states[pid], dataclasses.replace(task, train=False),
                                             {j: latest[j] for j in task.neighbours})
        history.append(torch.stack([flat(states[p].shared) for p in sorted(states)]))
    return history


@pytest.mark.parametrize("topology", ["ring", "erdos-renyi"])
@pytest.mark.parametrize("p", [1.0, 3.0, 9.0])
def test_fixed_p_gossip_matches_dense_mirror_space_reference(tmp_path, topology, p):
    # With a common fixed p, s_p(X_t) = A(t) s_p(X_{t-1}): linear gossip in mirror space
    # (p = 1: X_t = A(t) X_{t-1}, D-PSGD's averaging). Compared in (scaled) mirror space, where
    # float32 errors stay at eps: the p-th root amplifies them near sign cancellations.
    config = small_config(tmp_path, topology=topology, p_mode="fixed", fixed_p=p)
    strategy = HyperPrism(config)
    rules = {pid: HyperPrismNode.for_partition(config, pid) for pid in range(config.num_nodes)}
    history = gossip_without_training(strategy, rules, spread_models(rules), rounds=3)
    for round_, (before, after) in enumerate(zip(history, history[1:]), start=1):
        mixing = mixing_at(strategy, round_)
        scale = before.abs().amax(0)
        torch.testing.assert_close(sign_power(after / scale, p),
                                   mixing @ sign_power(before / scale, p), rtol=0, atol=2e-6)
    if p == 1.0:
        torch.testing.assert_close(history[1], mixing_at(strategy, 1) @ history[0], rtol=1e-5,
                                   atol=1e-6)


def mixing_at(strategy, round_: int) -> torch.Tensor:
    return torch.from_numpy(metropolis_hastings_weights(strategy.graphs.at(round_)))


def test_fixed_p_preserves_mirror_space_mass_and_reaches_its_consensus(tmp_path):
    # sum_i s_p(w_i) is preserved; the limit is s_p^-1(mean s_p(w_i^0)).
    p = 3.0
    config = small_config(tmp_path, topology="complete", p_mode="fixed", fixed_p=p)
    rules = {pid: HyperPrismNode.for_partition(config, pid) for pid in range(config.num_nodes)}
    history = gossip_without_training(HyperPrism(config), rules, spread_models(rules), 2)
    mass = sign_power(history[0], p).sum(0)
    torch.testing.assert_close(sign_power(history[1], p).sum(0), mass, rtol=1e-4, atol=1e-4)
    consensus = inverse_sign_power(mass / config.num_nodes, p)
    torch.testing.assert_close(history[-1], consensus.expand_as(history[-1]), rtol=1e-5,
                               atol=1e-5)


def test_plan_gives_symmetric_metropolis_weights_and_keeps_missing_weight_at_home(tmp_path):
    strategy = HyperPrism(small_config(tmp_path, num_nodes=8))
    tasks = strategy.plan_round(3, available=range(8))
    mixing = metropolis_hastings_weights(strategy.graphs.at(3))
    for i, task in tasks.items():
        assert task.round == 3 and task.train
        for j, w in zip(task.neighbours, task.weights):
            assert i in tasks[j].neighbours and w == pytest.approx(mixing[i, j])
        assert task.self_weight + sum(task.weights) == pytest.approx(1.0)
    partial = strategy.plan_round(3, available=[0, 1, 2])
    for i, task in partial.items():
        assert set(task.neighbours) <= {0, 1, 2} - {i}
        assert task.self_weight + sum(task.weights) == pytest.approx(1.0)
    assert not strategy.plan_round(strategy.config.num_rounds + 1, range(8))[0].train


def hypernet_params(state) -> dict[str, torch.Tensor]:
    return state.tensors["hypernet"]


def test_hypernetwork_is_trained_through_the_merge(tmp_path):
    # gradients reach psi_i and v_i when neighbours differ. For logistic
    # regression every layer is "decision", so the p_theta head gets no gradient.
    config = small_config(tmp_path, topology="complete")
    rules = {pid: HyperPrismNode.for_partition(config, pid) for pid in range(config.num_nodes)}
    states = spread_models(rules)
    before = {k: v.clone() for k, v in hypernet_params(states[0]).items()}
    gossip_without_training(HyperPrism(config), rules, states, rounds=1)
    after = hypernet_params(states[0])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "embedding" in changed and "heads.phi.weight" in changed
    assert {f"trunk.{i}.weight" for i in (0, 2, 4)} <= changed
    assert not {k for k in changed if k.startswith("heads.theta")}



def test_a_cnn_trains_both_heads_and_merges_each_layer_group_with_its_own_degree(tmp_path):
    # The CNN workload: conv layers (theta) and the classifier (phi) each get their own degree,
    # and the loss reaches both heads through the merge.
    config = small_config(tmp_path, topology="complete", model="cnn", num_nodes=3,
                          eval_size=50, local_steps=2)
    rules = {pid: HyperPrismNode.for_partition(config, pid) for pid in range(config.num_nodes)}
    states = spread_models(rules)
    before = {k: v.clone() for k, v in hypernet_params(states[0]).items()}
    history = gossip_without_training(HyperPrism(config), rules, states, rounds=1)
    after = hypernet_params(states[0])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"heads.theta.weight", "heads.phi.weight"} <= changed
    assert bool(torch.isfinite(history[-1]).all())
    _, metrics, _ = rules[0].step(states[0], HyperPrism(config).plan_round(2, range(3))[0],
                               {j: states[j].shared for j in (1, 2)})
    assert 1.0 <= metrics["p_theta"] <= 15.0 and 1.0 <= metrics["p_phi"] <= 15.0
    assert math.isfinite(metrics["accuracy"])

def test_at_consensus_the_hypernetwork_gets_no_gradient(tmp_path):
    # Identical models merge to themselves for any p (the battery checks the models), so
    # d loss / d p = 0 and the hypernetwork does not move.
    config = small_config(tmp_path, topology="complete")
    rules = {pid: HyperPrismNode.for_partition(config, pid) for pid in range(config.num_nodes)}
    states = {pid: rule.init_state() for pid, rule in rules.items()}
    before = {k: v.clone() for k, v in hypernet_params(states[0]).items()}
    gossip_without_training(HyperPrism(config), rules, states, rounds=2)
    for key, value in hypernet_params(states[0]).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


def test_in_process_runs_learn_and_the_last_round_trip_only_merges(tmp_path):
    # (determinism under a seed: the battery, for every algorithm)
    config = small_config(tmp_path, num_rounds=4, momentum=0.5)
    rows = run_in_process(round_loop(config))
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["accuracy_mean"] > rows[0]["accuracy_mean"] + 0.3
    assert "train_loss_mean" not in rows[-1]


def test_a_non_finite_neighbour_does_not_poison_the_node(tmp_path):
    config = small_config(tmp_path, topology="complete")
    rule = HyperPrismNode.for_partition(config, 0)
    state = rule.init_state()
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in state.shared.items()}
    task = HyperPrism(config).plan_round(1, range(config.num_nodes))[0]
    state, metrics, _ = rule.step(state, task, dict.fromkeys(task.neighbours, poisoned))
    assert metrics["neighbours_dropped"] == len(task.neighbours) and metrics["neighbours"] == 0
    assert all(bool(torch.isfinite(v).all()) for v in state.shared.values())
    assert all(bool(torch.isfinite(v).all()) for v in state.tensors["hypernet"].values())


def test_the_schedule_mode_merges_with_the_scheduled_degree_on_every_node(tmp_path):
    config = RunConfig.build(num_nodes=4, num_rounds=5, eval_size=200, p_mode="schedule",
                       p_schedule="linear", p_max=9.0, p_min=2.0, p_horizon=3,
                       output_dir=str(tmp_path))
    rows = run_in_process(round_loop(config, None))
    for row in rows:  # row r comes from round-trip r + 1
        expected = scheduled_degree("linear", row["round"] + 1, 9.0, 2.0, 3)
        assert row["p_phi"] == pytest.approx(dict.fromkeys(map(str, range(4)), expected))
        assert row["p_theta_mean"] == pytest.approx(expected)


def train_and_gossip(strategy, rules, states, round_: int) -> None:
    """Round-trip ``round_`` with local training, every node present."""
    latest = {p: s.shared for p, s in states.items()}
    for pid, task in strategy.plan_round(round_, latest).items():
        states[pid], _, _ = rules[pid].step(states[pid], task,
                                         {j: latest[j] for j in task.neighbours})


def test_the_trackers_average_is_the_average_of_the_latest_local_gradients(tmp_path):
    # Gradient tracking's invariant: with doubly stochastic (Metropolis-Hastings) weights,
    # mean_i y_i = mean_i g_i after every round, so the mixed trackers estimate the gradient
    # of the network's loss, which is what the degree step needs.
    config = small_config(tmp_path, p_mode="tracking", num_rounds=5, local_steps=3,
                          momentum=0.5)
    strategy = HyperPrism(config)
    rules = {pid: HyperPrismNode.for_partition(config, pid) for pid in range(config.num_nodes)}
    states = {pid: rule.init_state() for pid, rule in rules.items()}
    for round_ in range(1, 5):
        train_and_gossip(strategy, rules, states, round_)
        trackers = torch.stack([states[p].shared[TRACKER] for p in states]).double()
        gradients = torch.stack([states[p].tensors["tracking"]["local_update"]
                                 for p in states]).double()
        assert not torch.allclose(trackers, trackers.mean(0).expand_as(trackers))
        torch.testing.assert_close(trackers.mean(0), gradients.mean(0), rtol=0,
                                   atol=1e-5 * float(gradients.abs().max()))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_tracked_degree_moves_against_the_directional_derivative(tmp_path, sign):
    # d <y, merge_p(models)> / d p, checked by a float64 central difference of the power mean:
    # p goes down by p-step where it is positive, up where it is negative.
    config = small_config(tmp_path, p_mode="tracking", p_step=0.5)
    rule = HyperPrismNode.for_partition(config, 0)
    gen = torch.Generator().manual_seed(3)
    initial = rule.learner.initial_model
    models = [{k: torch.randn(v.shape, generator=gen) for k, v in initial.items()}
              for _ in range(3)]
    tracker = torch.randn(sum(initial[n].numel() for n in rule.names), generator=gen)
    for model in models:
        model[TRACKER] = sign * tracker
    weights = torch.tensor([0.5, 0.3, 0.2])
    extra = HyperPrismExtra(torch.zeros(1), p=4.0,
                            tracker_mixed=rule._mixed_tracker(models, weights))

    def objective(p: float) -> float:
        mirrored = sum(w * sign_power(flat({n: m[n] for n in rule.names}), p)
                       for w, m in zip(weights.double().tolist(), models))
        return float(sign * tracker.double() @ inverse_sign_power(mirrored, p))

    slope = (objective(4.0 + 1e-4) - objective(4.0 - 1e-4)) / 2e-4
    assert abs(slope) > 1e-3
    assert rule._tracked_degree(models, weights, extra) == 4.0 - 0.5 * math.copysign(1.0, slope)


def test_tracked_degrees_start_at_p_max_and_come_down_on_the_synthetic_task(tmp_path):
    # The default task, where a large p speeds up the first rounds and costs accuracy later
    # (README, "HyperPrism's degrees"): every node starts at p-max and lowers its own p.
    config = RunConfig.build(num_nodes=8, num_rounds=12, eval_size=500, p_mode="tracking",
                       output_dir=str(tmp_path), run_name="run")
    rows = run_in_process(round_loop(config))
    assert set(rows[1]["p_phi"].values()) == {15.0}
    final = rows[-1]["p_phi"]
    assert max(final.values()) < 15.0 and sum(final.values()) / len(final) < 12.0
    assert len(set(final.values())) > 1  # each node learns its own
    assert rows[-1]["p_theta"] == final  # logistic regression: one layer group, one degree


def test_descent_chooses_each_layer_groups_degree_from_its_part_of_the_tracker(tmp_path):
    # The mixed tracker asks theta (conv layers) for exactly the p = 15 merge and phi (the
    # head) for the opposite direction: p_theta = 15, p_phi = 1 (the linear merge).
    config = small_config(tmp_path, p_mode="descent", model="lenet", lr=0.5)
    rule = HyperPrismNode.for_partition(config, 0)
    gen = torch.Generator().manual_seed(4)
    initial = rule.learner.initial_model
    models = [{k: torch.randn(v.shape, generator=gen) for k, v in initial.items()}
              for _ in range(3)]
    weights = torch.tensor([0.5, 0.3, 0.2])
    far = merge_models(models, weights, {"theta": 15.0, "phi": 15.0}, rule.groups)
    linear = merge_models(models, weights, {"theta": 1.0, "phi": 1.0}, rule.groups)
    wanted = {n: (far[n] - linear[n]) * (1 if n in rule.groups["theta"] else -1)
              for n in rule.names}  # = -lr * tracker
    tracker = -flat({n: wanted[n] for n in rule.names}).float() / config.lr
    for model in models:
        model[TRACKER] = tracker
    extra = HyperPrismExtra(torch.zeros(1), local_update=tracker,
                            tracker_mixed=rule._mixed_tracker(models, weights))
    assert rule._descent_degrees(models, weights, extra) == {"theta": pytest.approx(15.0),
                                                             "phi": 1.0}
    models[2] = {k: v for k, v in models[2].items() if k != TRACKER}  # no tracker yet: linear
    extra = HyperPrismExtra(torch.zeros(1), local_update=tracker,
                            tracker_mixed=rule._mixed_tracker(models, weights))
    assert rule._descent_degrees(models, weights, extra) == {"theta": 1.0, "phi": 1.0}


def test_descent_departs_from_the_linear_merge_by_no_more_than_the_nodes_own_update(tmp_path):
    # A diverging neighbour (values 100x the others) whose huge tracker, mixed in, asks for
    # exactly the p = 15 merge, which follows that neighbour: the step is cut to the length of
    # the node's own last local update, so the merge stays linear. With an own update as long
    # as the tracked one the same merge is taken (the bound, not the tracker, decides).
    config = small_config(tmp_path, p_mode="descent", model="lenet", lr=0.3)
    rule = HyperPrismNode.for_partition(config, 0)
    gen = torch.Generator().manual_seed(5)
    models = [{k: torch.randn(v.shape, generator=gen) for k, v in
               rule.learner.initial_model.items()} for _ in range(3)]
    models[2] = {k: 100.0 * v for k, v in models[2].items()}
    weights = torch.tensor([0.4, 0.3, 0.3])
    far = merge_models(models, weights, {"theta": 15.0, "phi": 15.0}, rule.groups)
    linear = merge_models(models, weights, {"theta": 1.0, "phi": 1.0}, rule.groups)
    tracker = -flat({n: far[n] - linear[n] for n in rule.names}).float() / config.lr
    own_update = torch.randn(tracker.shape, generator=gen)  # |w| ~ 1, as a normal node's
    for model in models:
        model[TRACKER] = tracker
    mixed = rule._mixed_tracker(models, weights)
    bounded = HyperPrismExtra(torch.zeros(1), local_update=own_update, tracker_mixed=mixed)
    assert rule._descent_degrees(models, weights, bounded) == {"theta": 1.0, "phi": 1.0}
    unbounded = dataclasses.replace(bounded, local_update=tracker)
    assert rule._descent_degrees(models, weights, unbounded) == {
        "theta": pytest.approx(15.0), "phi": pytest.approx(15.0)}


def test_descent_keeps_the_default_task_near_plain_averaging(tmp_path):
    # The default task: a larger p lowers the loss there but costs accuracy (README); the
    # trust region of one local update keeps the degrees small (measured here: 2.2 in the
    # first informative merge, then 1.0-1.5) and the accuracy at least D-PSGD's.
    settings = {"num_nodes": 8, "num_rounds": 6, "eval_size": 500, "output_dir": str(tmp_path)}
    rows = run_in_process(round_loop(RunConfig(**settings, run_name="descent")))
    linear = run_in_process(round_loop(RunConfig.build(**settings, run_name="linear",
                                                          p_mode="fixed", fixed_p=1.0)))
    assert rows[0]["p_phi_mean"] == 1.0  # identical models: nothing to choose
    assert all(row["p_phi_mean"] < 3.0 for row in rows) and rows[-1]["p_phi_mean"] < 1.5
    assert all(a["accuracy_mean"] >= b["accuracy_mean"] for a, b in zip(rows, linear))
