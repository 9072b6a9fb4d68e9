"""A node group steps its nodes together: batched SGD and evaluation equal the per-node ones."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.setup.config import RunConfig
from strategies import algorithm_spec
from strategies.base.group import NodeGroup
from strategies.base.rule import NodeState, NodeTask


def group_of(config: RunConfig, batched: bool) -> NodeGroup:
    spec = algorithm_spec(config.algorithm)
    return NodeGroup({pid: spec.make_rule(config, pid) for pid in range(config.num_nodes)},
                     batched)


def test_batched_training_gives_each_node_its_own_sgd_and_momentum():
    # Unequal partitions (alpha 0.1): nodes take different numbers of steps in one epoch.
    config = RunConfig(algorithm="dpsgd", num_nodes=5, alpha=0.1, momentum=0.9, eval_size=300)
    groups = {batched: group_of(config, batched) for batched in (False, True)}
    assert groups[True].pool is not None and groups[False].pool is None
    steps = {rule.learner.local_steps for rule in groups[True].rules.values()}
    assert len(steps) > 1
    states = {pid: rule.init_state() for pid, rule in groups[False].rules.items()}
    tasks = {pid: NodeTask(1) for pid in states}
    outcomes = {}
    for batched, group in groups.items():
        outcomes[batched] = group.step(states, tasks, {})
        again = group.step({pid: o.state for pid, o in outcomes[batched].items()},
                           {pid: NodeTask(2) for pid in states}, {})
        outcomes[batched] = again
    for pid in states:
        per_node, batched = outcomes[False][pid], outcomes[True][pid]
        for group_name, tensors in per_node.state.tensors.items():  # model and momentum
            for key, value in tensors.items():
                torch.testing.assert_close(batched.state.tensors[group_name][key], value,
                                           rtol=1e-4, atol=1e-4)
        for key in ("accuracy", "loss", "train_loss"):
            assert abs(batched.metrics[key] - per_node.metrics[key]) < 1e-4, key


def test_batched_training_reports_each_nodes_first_minibatch_loss():
    # the divergence check compares a node's training loss with its first minibatch's loss
    # (DataLearner.training_fault): the batched loop must hand each node its own
    config = RunConfig(algorithm="dpsgd", num_nodes=5, alpha=0.1, eval_size=300)
    batched, per_node = group_of(config, True), group_of(config, False)
    pids = [3, 0, 4]
    noise = torch.Generator().manual_seed(0)
    starts = [{k: v + 0.01 * torch.randn(v.shape, generator=noise) for k, v in
               batched.rules[pid].learner.initial_model.items()} for pid in pids]
    updates = batched.pool.train(pids, starts, [torch.Generator().manual_seed(pid)
                                                for pid in pids])
    for pid, start, update in zip(pids, starts, updates):
        alone = per_node.rules[pid].learner.train(start, torch.Generator().manual_seed(pid))
        assert update.first_loss is not None and alone.first_loss is not None
        assert update.first_loss == pytest.approx(alone.first_loss, rel=1e-5)
        assert update.metrics["train_loss"] == pytest.approx(alone.metrics["train_loss"],
                                                             rel=1e-5)
    assert len({update.first_loss for update in updates}) == len(pids)


def test_a_batched_group_is_deterministic_and_steps_only_the_given_partitions():
    config = RunConfig(algorithm="hyperprism", num_nodes=4, eval_size=300, local_steps=3)
    results = []
    for _ in range(2):
        group = group_of(config, True)
        states = {pid: rule.init_state() for pid, rule in group.rules.items()}
        first = group.step(states, {pid: NodeTask(1) for pid in (0, 2)}, {})
        assert sorted(first) == [0, 2]
        shared = {pid: outcome.state.shared for pid, outcome in first.items()}
        second = group.step({pid: first[pid].state for pid in first},
                            {0: NodeTask(2, (2,), (0.5,), 0.5), 2: NodeTask(2, (0,), (0.5,), 0.5)},
                            shared)
        results.append({pid: (outcome.metrics, outcome.state) for pid, outcome in second.items()})
    for pid in (0, 2):
        assert results[0][pid][0] == results[1][pid][0]
        for key, value in results[0][pid][1].shared.items():
            assert torch.equal(value, results[1][pid][1].shared[key])


def test_a_group_whose_learners_cannot_be_batched_steps_node_by_node():
    config = RunConfig(algorithm="dpsgd", num_nodes=2, eval_size=100)
    rules = {pid: algorithm_spec("dpsgd").make_rule(config, pid) for pid in range(2)}
    rules[1].learner.initial_model = {**rules[1].learner.initial_model,
                                      "extra": torch.zeros(1)}  # a buffer: not all parameters
    assert NodeGroup(rules, batched=True).pool is None
    assert isinstance(NodeState(), NodeState)
