"""Plug-in mode's node side: the native node rules around the user's train handler
(``HandlerLearner``), and the orchestrator factory."""

from __future__ import annotations

import logging

import pytest
import torch

from flwr_hyperprism.client.handler import HandlerLearner, parameter_groups
from flwr_hyperprism.math.models import DECISION, REPRESENTATION
from flwr_hyperprism.server.plugin import decentralized_strategy
from flwr_hyperprism.setup.config import RunConfig
from strategies import algorithm_spec
from strategies.adom import ADOMNode, ADOMUpdate
from strategies.base.rule import NodeTask, StateDict
from strategies.dpsgd import DPSGDNode
from strategies.hyperprism import TRACKER, HyperPrismNode
from strategies.mudag import MudagNode, MudagUpdate
from tests.variants import make_config

NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def model(seed: int) -> StateDict:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (4, 3), "fc1.bias": (4,), "fc2.weight": (2, 4), "fc2.bias": (2,)}
    tensors = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    return {**tensors, "bn.num_batches_tracked": torch.tensor(seed)}  # not floating point


def unchanged(full: StateDict) -> tuple[StateDict, dict[str, float]]:
    return dict(full), {}


def test_the_last_module_is_the_decision_group():
    assert parameter_groups(list(NAMES)) == {REPRESENTATION: ["fc1.weight", "fc1.bias"],
                                             DECISION: ["fc2.weight", "fc2.bias"]}
    assert parameter_groups(["weight", "bias"]) == {REPRESENTATION: [],
                                                    DECISION: ["weight", "bias"]}


def test_linear_merge_is_the_weighted_average_and_keeps_integer_tensors():
    learner = HandlerLearner(model(1), unchanged, RunConfig(lr=0.1))
    rule = DPSGDNode(RunConfig(algorithm="dpsgd"), 0, learner)
    own, other = model(1), model(2)
    task = NodeTask(1, (5,), (0.25,), 0.75)
    after, _, evaluated = rule.step(rule.init_state(), task, {5: other})
    for name in NAMES:
        torch.testing.assert_close(after.shared[name], 0.75 * own[name] + 0.25 * other[name])
        assert torch.equal(evaluated[name], after.shared[name])  # what is scored
    assert after.shared["bn.num_batches_tracked"] == own["bn.num_batches_tracked"]


def test_the_handler_must_return_the_whole_model():
    learner = HandlerLearner(model(1), lambda full: ({"fc1.weight": full["fc1.weight"]}, {}),
                             RunConfig(lr=0.1))
    rule = DPSGDNode(RunConfig(algorithm="dpsgd"), 0, learner)
    with pytest.raises(ValueError, match="return the whole model"):
        rule.step(rule.init_state(), NodeTask(1), {})


def test_the_hypernetwork_steps_on_the_pseudo_gradient_after_training():
    def sgd(full):  # pseudo-gradient 1 everywhere: (merged - trained) / lr
        return {k: v - 0.1 if v.is_floating_point() else v for k, v in full.items()}, {"x": 1.0}

    config = RunConfig.build(lr=0.1, hn_lr=1.0, p_mode="hypernetwork")
    rule = HyperPrismNode(config, 0, HandlerLearner(model(1), sgd, config))
    state = rule.init_state()
    task = NodeTask(1, (3,), (0.5,), 0.5)
    after, metrics, _ = rule.step(state, task, {3: model(2)})
    assert {"p_theta", "p_phi", "x"} <= metrics.keys()
    assert "hn_loss" not in metrics  # no fresh minibatch: the user's loss is unknown
    assert any(not torch.equal(after.tensors["hypernet"][k], state.tensors["hypernet"][k])
               for k in state.tensors["hypernet"])
    torch.testing.assert_close(after.tensors["grad_summary"]["summary"].reshape(-1, 3),
                               torch.tensor([[1.0, 0.0, n ** 0.5] for n in (12, 4, 8, 2)]))

    alone, _, _ = rule.step(state, NodeTask(1), {})
    assert all(torch.equal(alone.tensors["hypernet"][k], v)  # without neighbours d loss/d p = 0
               for k, v in state.tensors["hypernet"].items())


def test_plug_in_hyperprism_runs_the_native_rule(tmp_path):
    # A handler that trains exactly like the native learner: plug-in HyperPrism (its default,
    # learned degrees) then follows the native run's degrees and models exactly.
    config = make_config(tmp_path, "hyperprism", num_nodes=4, num_rounds=3, momentum=0.5)
    spec = algorithm_spec("hyperprism")
    plan = spec.plan(config)
    native = {pid: spec.make_rule(config, pid) for pid in range(4)}
    trainers = {pid: spec.node_rule.native_learner(config, pid) for pid in range(4)}
    gens: dict[int, torch.Generator] = {}

    def handler(pid):
        return lambda full: (trainers[pid].train(full, gens[pid]).model, {})

    plugged = {pid: spec.make_rule(config, pid, HandlerLearner(
        native[pid].learner.initial_model, handler(pid), config)) for pid in range(4)}
    states = {"native": {p: r.init_state() for p, r in native.items()},
              "plugged": {p: r.init_state() for p, r in plugged.items()}}
    for round_, stage in plan.schedule():
        tasks = plan.plan_round(round_, range(4), stage)
        degrees = {}
        for mode, rules in (("native", native), ("plugged", plugged)):
            latest = {p: s.shared for p, s in states[mode].items()}
            for pid, task in tasks.items():
                gens[pid] = rules[pid].generator(task)
                states[mode][pid], metrics, _ = rules[pid].step(
                    states[mode][pid], task, {j: latest[j] for j in task.neighbours})
                degrees[mode, pid] = metrics["p_theta"]
        for pid in range(4):
            assert degrees["native", pid] == degrees["plugged", pid]
            for k, v in states["native"][pid].shared.items():
                assert torch.equal(states["plugged"][pid].shared[k], v), (round_, pid, k)
    assert all(states["plugged"][pid].shared[TRACKER].abs().sum() > 0 for pid in range(4))


# Mudag: rows of Wm (sum 1) and FastMix momentum, two stages per round; ADOM+: rows of the
# Laplacian-based W (sum 0) and chi. The last round-trip does not train.
SCHEDULES = {
    MudagNode: ((0.5, 0.5), {"eta_w": 0.3}, [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]),
    ADOMNode: ((0.5, -0.5), {"chi": 2.0}, [(1, 0), (2, 0), (3, 0)]),
}


@pytest.mark.parametrize(("rule_type", "method_type"),
                         [(MudagNode, MudagUpdate), (ADOMNode, ADOMUpdate)])
def test_a_one_step_sgd_handler_gives_the_method_its_exact_gradient(rule_type, method_type):
    # f(x) = 0.5 |x - target|^2; the user's handler takes one SGD step with the run's lr, so
    # the pseudo-gradient (x - trained) / lr is grad f(x) and plug-in equals the method itself.
    lr = 0.1
    config = RunConfig(algorithm=rule_type is MudagNode and "mudag" or "adom", lr=lr)
    target = model(9)
    calls = []

    def train(full):
        calls.append(full)
        assert full.keys() == target.keys()  # the whole model, integer tensors included
        return {k: v - lr * (v - target[k]) if v.is_floating_point() else v
                for k, v in full.items()}, {}

    def gradient(params):
        return {k: v - target[k] for k, v in params.items()}

    (self_weight, weight), coefficients, schedule = SCHEDULES[rule_type]
    learners = {i: HandlerLearner(model(i + 1), train, config) for i in (0, 1)}
    rules = {i: rule_type(config, i, learners[i]) for i in (0, 1)}
    method = method_type(config)
    plugged = {i: rules[i].init_state() for i in (0, 1)}
    reference = {i: method.init_state({n: model(i + 1)[n] for n in NAMES}) for i in (0, 1)}
    for round_, stage in schedule:
        calls.clear()
        train_round = round_ < schedule[-1][0]
        tasks = {i: NodeTask(round_, (1 - i,), (weight,), self_weight, train_round,
                             coefficients, stage) for i in (0, 1)}
        shared = {i: plugged[i].shared for i in (0, 1)}
        scored = {}
        for i in (0, 1):
            plugged[i], _, scored[i] = rules[i].step(
                plugged[i], tasks[i], {1 - i: shared[1 - i]})
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
            assert (scored[i] is None) == (evaluated is None)
            if evaluated is not None:  # the evaluate message scores the method's model
                for k, v in evaluated.items():
                    torch.testing.assert_close(scored[i][k], v)
                assert scored[i]["bn.num_batches_tracked"] == i + 1


@pytest.mark.parametrize(("settings", "message"), [
    ({"algorithm": "fedavg"}, "'algorithm' = 'fedavg' is not one of"),
    ({"order": "cta", "p_mode": "fixed"}, "use order='atc'"),
    ({"num_nodes": 1}, "num-nodes"),
    ({"fraction_train": 0.5, "min_available_nodes": 2},
     r"fraction_train, min_available_nodes: FedAvg's client sampling, .* every node trains"),
    ({"densty": 0.5}, r"densty: not settings of the run or of algorithm 'hyperprism' "
                      r"\(densty is unknown\); docs/configuration.md lists them all"),
    ({"algorithm": "dpsgd", "p_mode": "fixed"}, r"p_mode is a setting of hyperprism"),
    ({"algorithm": "swarmsgd", "swarm_local_steps": 2}, "settings of the native apps'"),
    ({"momentum": 0.9}, "settings of the native apps' data, model and training"),
])
def test_factory_rejects_what_plug_in_mode_cannot_do(settings, message):
    with pytest.raises(ValueError, match=message):
        decentralized_strategy(**settings)


def test_plug_in_hyperprism_has_the_native_default_degrees():
    assert decentralized_strategy(num_nodes=3).config == RunConfig(num_nodes=3)


def test_local_layers_stay_out_of_the_merge_and_the_pseudo_gradient():
    def sgd(full):
        return {k: v - 0.1 if v.is_floating_point() else v for k, v in full.items()}, {}

    config = RunConfig(lr=0.1, local_layers="fc2.*")
    learner = HandlerLearner(model(1), sgd, config)
    assert learner.names == ("fc1.weight", "fc1.bias")
    rule = HyperPrismNode(config, 0, learner)
    own, other = model(1), model(2)
    task = NodeTask(1, (5,), (0.5,), 0.5)
    state = rule.init_state()
    state.shared[TRACKER] = torch.zeros(16)  # fc1's 12 + 4 parameters: fc2 is not tracked
    after, _, evaluated = rule.step(state, task, {5: {**other, TRACKER: torch.ones(16)}})
    for name in ("fc2.weight", "fc2.bias"):  # the node's own, then its own training
        torch.testing.assert_close(evaluated[name], own[name])
        torch.testing.assert_close(after.shared[name], own[name] - 0.1)
    assert not torch.equal(evaluated["fc1.weight"], own["fc1.weight"])  # merged
    assert after.shared[TRACKER].shape == (16,)


def test_a_handler_that_puts_its_own_head_back_is_reported(caplog):
    # what a FedPer-style handler does: train the merged model, then restore its saved head
    saved = model(1)

    def restoring(full):
        return {**full, "fc2.weight": saved["fc2.weight"] - 0.01,
                "fc2.bias": saved["fc2.bias"] - 0.01}, {}

    for local_layers, warned in (("", True), ("fc2.*", False)):
        config = RunConfig(algorithm="dpsgd", lr=0.1, local_layers=local_layers)
        learner = HandlerLearner(model(1), restoring, config, previous=model(1), partition_id=3)
        rule = DPSGDNode(config, 3, learner)
        task = NodeTask(1, (5,), (0.5,), 0.5)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flwr"):
            rule.step(rule.init_state(), task, {5: model(2)})
        messages = [r.getMessage() for r in caplog.records]
        assert any("partition 3: the train handler returned ['fc2.weight', 'fc2.bias']" in m
                   and "local_layers='fc2.*'" in m for m in messages) == warned


@pytest.mark.parametrize("algorithm", ["mudag", "adom"])
def test_local_layers_are_refused_where_no_model_is_merged(algorithm):
    with pytest.raises(ValueError, match="local-layers='fc2.*'.* algorithms that merge models"):
        decentralized_strategy(algorithm, num_nodes=3, lr=0.1, local_layers="fc2.*")
