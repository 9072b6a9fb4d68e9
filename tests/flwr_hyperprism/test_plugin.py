"""Plug-in mode's node side (merge, hypernetwork from the pseudo-gradient) and its factory."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.models import DECISION, REPRESENTATION
from flwr_hyperprism.plugin import (
    EVALUATED,
    GRADIENT_METHODS,
    PluginGradientNode,
    PluginNode,
    decentralized_strategy,
    parameter_groups,
    plugin_node,
)
from strategies.rule import NodeTask

NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (4, 3), "fc1.bias": (4,), "fc2.weight": (2, 4), "fc2.bias": (2,)}
    tensors = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    return {**tensors, "bn.num_batches_tracked": torch.tensor(seed)}  # not floating point


def test_the_last_module_is_the_decision_group():
    assert parameter_groups(list(NAMES)) == {REPRESENTATION: ["fc1.weight", "fc1.bias"],
                                             DECISION: ["fc2.weight", "fc2.bias"]}
    assert parameter_groups(["weight", "bias"]) == {REPRESENTATION: [],
                                                    DECISION: ["weight", "bias"]}


def test_linear_merge_is_the_weighted_average_and_keeps_integer_tensors():
    node = PluginNode(RunConfig(algorithm="dpsgd"), 0, NAMES)
    own, other = model(1), model(2)
    task = NodeTask(1, (5,), (0.25,), 0.75)
    merged = node.merge(node.init_state(own), task, {5: other}, {})
    for name in NAMES:
        torch.testing.assert_close(merged[name], 0.75 * own[name] + 0.25 * other[name])
    assert merged["bn.num_batches_tracked"] == own["bn.num_batches_tracked"]


def test_hypernetwork_learns_from_the_pseudo_gradient():
    config = RunConfig(lr=0.1, hn_lr=1.0, p_mode="hypernetwork")
    node = PluginNode(config, 0, NAMES)
    state = node.init_state(model(1))
    metrics: dict[str, float] = {}
    merged = node.merge(state, NodeTask(1, (3,), (0.5,), 0.5), {3: model(2)}, metrics)
    assert {"p_theta", "p_phi"} <= metrics.keys()
    trained = {k: v.detach() - 0.1 * torch.ones_like(v) if v.is_floating_point() else v
               for k, v in merged.items()}
    after = node.learn(state, merged, trained, 1, metrics)
    assert metrics["hn_steps"] == 1.0 and after.round == 1
    assert any(not torch.equal(after.tensors["hypernet"][k], state.tensors["hypernet"][k])
               for k in state.tensors["hypernet"])
    assert all(torch.equal(after.shared[k], trained[k]) for k in trained)
    assert all(torch.equal(after.tensors[EVALUATED][k], merged[k].detach()) for k in merged)
    assert after.tensors["grad_summary"]["summary"].abs().sum() > 0  # pseudo-gradient = 1


def test_without_neighbours_the_hypernetwork_does_not_step():
    node = PluginNode(RunConfig(p_mode="hypernetwork"), 0, NAMES)
    state = node.init_state(model(1))
    metrics: dict[str, float] = {}
    merged = node.merge(state, NodeTask(1), {}, metrics)
    node.learn(state, merged, {k: v.detach() for k, v in merged.items()}, 1, metrics)
    assert "hn_steps" not in metrics


# Mudag: rows of Wm (sum 1) and FastMix momentum, two stages per round; ADOM+: rows of the
# Laplacian-based W (sum 0) and chi. The last round-trip does not train.
SCHEDULES = {
    "mudag": ((0.5, 0.5), {"eta_w": 0.3}, [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]),
    "adom": ((0.5, -0.5), {"chi": 2.0}, [(1, 0), (2, 0), (3, 0)]),
}


@pytest.mark.parametrize("algorithm", sorted(GRADIENT_METHODS))
def test_a_one_step_sgd_handler_gives_the_method_its_exact_gradient(algorithm):
    # f(x) = 0.5 |x - target|^2; the user's handler takes one SGD step with the run's lr, so
    # the pseudo-gradient (x - trained) / lr is grad f(x) and plug-in equals the method itself.
    lr = 0.1
    config = RunConfig(algorithm=algorithm, lr=lr)
    target = model(9)
    calls = []

    def train(full):
        calls.append(full)
        assert full.keys() == target.keys()  # the whole model, integer tensors included
        return {k: v - lr * (v - target[k]) if v.is_floating_point() else v
                for k, v in full.items()}

    def gradient(params):
        return {k: v - target[k] for k, v in params.items()}

    (self_weight, weight), coefficients, schedule = SCHEDULES[algorithm]
    node, method = plugin_node(config, 0, NAMES), GRADIENT_METHODS[algorithm](config)
    assert isinstance(node, PluginGradientNode)
    plugged = {i: node.init_state(model(i + 1)) for i in (0, 1)}
    reference = {i: method.init_state({n: model(i + 1)[n] for n in NAMES}) for i in (0, 1)}
    for round_, stage in schedule:
        calls.clear()
        train_round = round_ < schedule[-1][0]
        tasks = {i: NodeTask(round_, (1 - i,), (weight,), self_weight, train_round,
                             coefficients, stage) for i in (0, 1)}
        shared = {i: plugged[i].shared for i in (0, 1)}
        plugged = {i: node.round_trip(plugged[i], tasks[i], {1 - i: shared[1 - i]}, train, {})
                   for i in (0, 1)}
        shared = {i: reference[i].shared for i in (0, 1)}
        outcome = {i: method.round_trip(reference[i], tasks[i], {1 - i: shared[1 - i]},
                                        gradient) for i in (0, 1)}
        reference = {i: state for i, (state, _) in outcome.items()}
        assert len(calls) == (2 if train_round and stage == 0 else 0)
        for i in (0, 1):
            for group, tensors in reference[i].tensors.items():
                for k, v in tensors.items():
                    torch.testing.assert_close(plugged[i].tensors[group][k], v,
                                               rtol=1e-5, atol=1e-6)
            evaluated = outcome[i][1]
            if evaluated is not None:  # the evaluate message scores the method's model
                for k, v in evaluated.items():
                    torch.testing.assert_close(plugged[i].tensors[EVALUATED][k], v)
            assert plugged[i].tensors[EVALUATED]["bn.num_batches_tracked"] == i + 1


@pytest.mark.parametrize(("settings", "message"), [
    ({"algorithm": "fedavg"}, "'algorithm' = 'fedavg' is not one of"),
    ({"order": "cta"}, "use order='atc'"),
    ({"p_mode": "tracking"}, "p-mode='tracking' is not available in plug-in mode yet"),
    ({"num_nodes": 1}, "num-nodes"),
])
def test_factory_rejects_what_plug_in_mode_cannot_do(settings, message):
    with pytest.raises(ValueError, match=message):
        decentralized_strategy(**settings)


def test_plug_in_hyperprism_uses_the_papers_hypernetwork_unless_told_otherwise():
    assert decentralized_strategy(num_nodes=3).config.p_mode == "hypernetwork"
