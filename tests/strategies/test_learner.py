"""The native learner: the node's own model, SGD on its partition, the global test set."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.config import RunConfig
from strategies import algorithm_spec
from strategies.decentralized import make_strategy, run_in_process
from strategies.dpsgd import DPSGDNode
from strategies.learner import (
    DataLearner,
    load_optimizer_state,
    node_data,
    optimizer_state,
    resolve_device,
)
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


def test_the_device_setting_resolves_or_says_what_to_set():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # the suite hides CUDA (conftest)
    with pytest.raises(ValueError, match=r"device='cuda', but this machine has 0 CUDA device"
                                         r".*use device='auto' or 'cpu'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="'device' = 'gpu' is not one of: auto, cpu, cuda"):
        RunConfig(device="gpu")


@pytest.mark.parametrize("algorithm", ["hyperprism", "mudag"])
def test_device_cpu_and_auto_runs_agree_and_keep_state_on_the_cpu(tmp_path, algorithm):
    rows = {}
    for device in ("cpu", "auto"):
        config = RunConfig(algorithm=algorithm, device=device, num_nodes=4, num_rounds=2,
                           local_steps=2, eval_size=300, mudag_max_gossip=2,
                           output_dir=str(tmp_path), run_name=device)
        rows[device] = [{k: v for k, v in row.items() if k != "seconds"}
                        for row in run_in_process(make_strategy(config))]
    assert rows["cpu"] == rows["auto"]  # a CPU machine (conftest): bit for bit
    spec = algorithm_spec(algorithm)
    rule = spec.make_rule(config, 0)
    task = NodeTask(1, coefficients=spec.orchestrator(config).coefficients(1))
    state, _ = rule.step(rule.init_state(), task, {})
    assert {t.device.type for group in state.tensors.values() for t in group.values()} == {"cpu"}
