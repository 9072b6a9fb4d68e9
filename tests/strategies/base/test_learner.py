"""The native learner: the node's own model, SGD on its partition, the global test set."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.rounds import round_loop
from flwr_hyperprism.setup.config import RunConfig
from strategies import algorithm_spec
from strategies.base.learner import (
    DataLearner,
    evaluation_split,
    node_data,
    resolve_device,
)
from strategies.base.rule import NodeTask
from strategies.dpsgd import DPSGDNode
from tests.variants import config_of


def test_the_optimizer_state_round_trips_through_the_node_state():
    config = RunConfig(num_nodes=5, momentum=0.9, local_steps=2, eval_size=100)
    rule = DPSGDNode.for_partition(config, 0)
    state, _, _ = rule.step(rule.init_state(), NodeTask(1), {})
    buffers = state.tensors["optimizer"]
    assert buffers and all(torch.count_nonzero(v) > 0 for v in buffers.values())
    optimizer = rule.learner.optimizer
    optimizer.load_state(buffers)
    assert optimizer.state().keys() == buffers.keys()
    for key, value in optimizer.state().items():
        assert torch.equal(value, buffers[key])


def test_a_state_without_optimizer_resets_the_momentum():
    config = RunConfig(num_nodes=5, momentum=0.9, local_steps=2, eval_size=100)
    rule = DPSGDNode.for_partition(config, 0)
    rule.step(rule.init_state(), NodeTask(1), {})
    rule.learner.load(rule.init_state())
    assert rule.learner.optimizer.state() == {}


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


def test_training_diverged_when_its_loss_rose_past_the_ratio_times_where_it_started():
    config = RunConfig(num_nodes=5, local_steps=3, eval_size=100, max_train_loss_ratio=4.0)
    learner = DataLearner(config, node_data(config, 0))
    update = learner.train(learner.initial_model, torch.Generator().manual_seed(0))
    first, _ = learner.gradient(learner.initial_model, torch.Generator().manual_seed(0))
    assert update.first_loss == pytest.approx(first["train_loss"])  # the same first minibatch
    assert learner.training_fault(update) is None
    # the reference is the larger of the first minibatch's loss and ln 10 (a uniform guess)
    uniform = math.log(10)
    for first_loss, loss, diverged in [(0.01, 1.001 * 4 * uniform, True),
                                       (0.01, 0.999 * 4 * uniform, False),
                                       (50.0, 199.0, False), (50.0, 201.0, True),
                                       (None, 1.001 * 4 * uniform, True)]:
        fault = learner.training_fault(dataclasses.replace(
            update, metrics={"train_loss": loss}, first_loss=first_loss))
        assert (fault is not None) == diverged, (first_loss, loss)
    fault = learner.training_fault(dataclasses.replace(update, metrics={"train_loss": 201.0},
                                                       first_loss=50.0))
    assert fault == "train_loss 201 > 4 x max(first minibatch's loss, ln 10) = 200"
    with pytest.raises(ValueError, match="'max-train-loss-ratio' must be >= 1"):
        config.replace(max_train_loss_ratio=0.5)


def test_native_local_layers_keep_the_nodes_own_tensors(zero_learning_rate):
    config = RunConfig(algorithm="dpsgd", num_nodes=5, local_steps=1, eval_size=100,
                       local_layers="classifier.bias")
    rule = DPSGDNode.for_partition(config, 0)
    assert rule.learner.names == ("classifier.weight",)
    own = {k: torch.randn(v.shape) for k, v in rule.learner.initial_model.items()}
    other = {k: torch.randn(v.shape) for k, v in own.items()}
    state = rule.init_state()
    state.tensors["shared"] = own
    after, _, _ = rule.step(state, NodeTask(1, (4,), (0.5,), 0.5), {4: other})
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
        config = config_of(algorithm, device=device, num_nodes=4, num_rounds=2,
                           local_steps=2, eval_size=300, mudag_max_gossip=2,
                           output_dir=str(tmp_path), run_name=device)
        rows[device] = [{k: v for k, v in row.items() if k != "seconds"}
                        for row in run_in_process(round_loop(config))]
    assert rows["cpu"] == rows["auto"]  # a CPU machine (conftest): bit for bit
    spec = algorithm_spec(algorithm)
    rule = spec.make_rule(config, 0)
    task = NodeTask(1, coefficients=spec.plan(config).coefficients(1))
    state, _, _ = rule.step(rule.init_state(), task, {})
    assert {t.device.type for group in state.tensors.values() for t in group.values()} == {"cpu"}


def test_eval_size_gives_every_node_one_shared_fixed_test_subset():
    config = RunConfig(num_nodes=4, eval_size=300)
    subsets = [node_data(config, pid).test for pid in range(4)]
    assert len(subsets[0]) == 300 and all(s is subsets[0] for s in subsets)  # one per process
    evaluation_split.cache_clear()
    again = node_data(config, 0).test  # another process: the same subset, drawn again
    assert again is not subsets[0]
    assert torch.equal(again.x, subsets[0].x) and torch.equal(again.y, subsets[0].y)
    full = node_data(config.replace(eval_size=0), 0).test
    assert len(full) > 300


def test_a_validation_fraction_is_held_out_of_the_partitions_and_evaluated_on():
    config = RunConfig(num_nodes=4, validation_fraction=0.1)
    data = [node_data(config, pid) for pid in range(4)]
    full = node_data(config.replace(validation_fraction=0.0), 0).test  # the test set
    validation = data[0].test
    assert all(d.test is validation for d in data) and len(validation) == 3000  # of 30,000
    assert not torch.equal(validation.x[:10], full.x[:10])
    trained_on = torch.cat([d.train.x for d in data])
    assert len(trained_on) == 27_000  # every other training sample, once
    # no validation sample is in a partition (rows compared by their pixel sums and first
    # pixels, which are distinct for this continuous data)
    keys = {(float(x.sum()), float(x.flatten()[0])) for x in trained_on}
    assert not any((float(x.sum()), float(x.flatten()[0])) in keys for x in validation.x)


def test_node_data_rejects_partition_ids_outside_the_federation():
    with pytest.raises(ValueError, match="partition id 4 is outside 0..3"):
        node_data(RunConfig(num_nodes=4), 4)
