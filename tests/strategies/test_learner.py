"""The native learner: the node's own model, SGD on its partition, the global test set."""

from __future__ import annotations

import torch

from flwr_hyperprism.config import RunConfig
from strategies.dpsgd import DPSGDNode
from strategies.learner import DataLearner, load_optimizer_state, node_data, optimizer_state
from strategies.rule import NodeTask


def test_the_optimizer_state_round_trips_through_the_node_state():
    config = RunConfig(num_nodes=5, momentum=0.9, local_steps=2, eval_size=100)
    rule = DPSGDNode.for_partition(config, 0)
    state, _ = rule.step(rule.init_state(), NodeTask(1), {})
    buffers = state.tensors["optimizer"]
    assert buffers and all(torch.count_nonzero(v) > 0 for v in buffers.values())
    optimizer = rule.learner.optimizer
    load_optimizer_state(optimizer, buffers)
    assert optimizer_state(optimizer).keys() == buffers.keys()
    for key, value in optimizer_state(optimizer).items():
        assert torch.equal(value, buffers[key])


def test_a_state_without_optimizer_resets_the_momentum():
    config = RunConfig(num_nodes=5, momentum=0.9, local_steps=2, eval_size=100)
    rule = DPSGDNode.for_partition(config, 0)
    rule.step(rule.init_state(), NodeTask(1), {})
    rule.learner.load(rule.init_state())
    assert optimizer_state(rule.learner.optimizer) == {}


def test_a_local_update_reports_the_last_minibatch_gradient():
    config = RunConfig(num_nodes=5, local_steps=3, eval_size=100)
    learner = DataLearner(config, node_data(config, 0))
    start = learner.initial_model
    update = learner.train(start, torch.Generator().manual_seed(0))
    assert update.gradient.keys() == set(learner.names)
    assert update.metrics.keys() == {"train_loss"}
    assert any(not torch.equal(update.model[n], start[n]) for n in learner.names)
    # the first of the three steps starts at the zero model: its gradient is not the last one
    _, first = learner.gradient(start, torch.Generator().manual_seed(0))
    assert any(not torch.allclose(first[n], update.gradient[n]) for n in learner.names)


def test_native_local_layers_keep_the_nodes_own_tensors(zero_learning_rate):
    config = RunConfig(algorithm="dpsgd", num_nodes=5, local_steps=1, eval_size=100,
                       local_layers="classifier.bias")
    rule = DPSGDNode.for_partition(config, 0)
    assert rule.learner.names == ("classifier.weight",)
    own = {k: torch.randn(v.shape) for k, v in rule.learner.initial_model.items()}
    other = {k: torch.randn(v.shape) for k, v in own.items()}
    state = rule.init_state()
    state.tensors["shared"] = own
    after, _ = rule.step(state, NodeTask(1, (4,), (0.5,), 0.5), {4: other})
    torch.testing.assert_close(after.shared["classifier.weight"],
                               0.5 * own["classifier.weight"] + 0.5 * other["classifier.weight"])
    assert torch.equal(after.shared["classifier.bias"], own["classifier.bias"])
