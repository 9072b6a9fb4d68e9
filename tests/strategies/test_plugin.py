"""Plug-in mode's node side (merge, hypernetwork from the pseudo-gradient) and its factory."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.models import DECISION, REPRESENTATION
from strategies.decentralized import NodeTask
from strategies.plugin import PluginNode, decentralized_strategy, parameter_groups

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
    config = RunConfig(lr=0.1, hn_lr=1.0)
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
    assert all(torch.equal(after.tensors["merged"][k], merged[k].detach()) for k in merged)
    assert after.tensors["grad_summary"]["summary"].abs().sum() > 0  # pseudo-gradient = 1


def test_without_neighbours_the_hypernetwork_does_not_step():
    node = PluginNode(RunConfig(), 0, NAMES)
    state = node.init_state(model(1))
    metrics: dict[str, float] = {}
    merged = node.merge(state, NodeTask(1), {}, metrics)
    node.learn(state, merged, {k: v.detach() for k, v in merged.items()}, 1, metrics)
    assert "hn_steps" not in metrics


@pytest.mark.parametrize(("settings", "message"), [
    ({"algorithm": "mudag"}, "has no plug-in mode; use one of hyperprism, dpsgd, swarmsgd"),
    ({"algorithm": "adom"}, "has no plug-in mode"),
    ({"order": "cta"}, "use order='atc'"),
    ({"num_nodes": 1}, "num-nodes"),
])
def test_factory_rejects_what_plug_in_mode_cannot_do(settings, message):
    with pytest.raises(ValueError, match=message):
        decentralized_strategy(**settings)
