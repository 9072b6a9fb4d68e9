"""The fault matrix (README "Faults and bad input"): bad peers, failing nodes, restarts.

Configuration errors are in tests/flwr_hyperprism/setup/test_config.py and test_data.py; the cases
that need a federation (missing data, an impossible partition, too few SuperNodes) are here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message
from flwr.simulation import run_simulation

from flwr_hyperprism.client.app import make_client_app
from flwr_hyperprism.messages.protocol import NEIGHBOUR_PREFIX
from flwr_hyperprism.orchestration.evaluation import finite_average
from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.membership import wait_for_partitions
from flwr_hyperprism.orchestration.rounds import round_loop
from flwr_hyperprism.server.app import make_server_app, run
from flwr_hyperprism.setup.config import RunConfig
from strategies import ALGORITHMS
from strategies.base.learner import LocalUpdate
from strategies.base.rule import NodeTask
from strategies.base.screening import divergence_fault
from tests.harness import LocalGrid, stamp, train_round
from tests.variants import (
    config_of,
    make_config,
    metrics_rows,
    model_groups,
    nodes_for,
    spread_states,
)
from tests.variants import variant as variant_of


def poisoned(model: dict[str, torch.Tensor], fault: str) -> dict[str, torch.Tensor]:
    """``model`` with one fault a broken or malicious neighbour could send."""
    first = next(iter(model))
    value = model[first]
    changed = {
        "nan": {first: torch.full_like(value, float("nan"))},
        "inf": {first: torch.full_like(value, -float("inf"))},
        "shape": {first: torch.cat([value.reshape(-1), value.reshape(-1)])},
        "dtype": {first: value.double()},
        "huge": {first: torch.full_like(value, 1e30)},
        "extra": {"extra.weight": torch.zeros(3)},
    }
    if fault == "missing":
        return {k: v for k, v in model.items() if k != first}
    return {**model, **changed[fault]}


FAULTS = ("nan", "inf", "shape", "dtype", "huge", "extra", "missing")


def records(caplog, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# --- a bad neighbour is dropped, counted and logged once; the node stays finite ------------


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("variant", ["hyperprism", "hyperprism-fixed-p3", "hyperprism-hypernetwork",
                                     "dpsgd", "swarmsgd", "mudag", "adom"])
def test_a_bad_neighbour_is_dropped_and_the_rest_renormalised(tmp_path, caplog, variant, fault):
    config = make_config(tmp_path, variant, num_nodes=3, fixed_p=9.0)
    strategy, rules = nodes_for(config)
    states = {pid: rule.init_state() for pid, rule in rules.items()}
    gen = torch.Generator().manual_seed(3)
    for state in states.values():  # distinct, honest neighbours
        for name in dict.fromkeys(model_groups(rules[0]) + ("shared",)):
            state.tensors[name] = {k: v + 0.1 * torch.randn(v.shape, generator=gen)
                                   for k, v in state.tensors[name].items()}
    laplacian = variant == "adom"  # ADOM+ mixes with a Laplacian row (sum 0)
    task = NodeTask(1, (1, 2), (-0.25, -0.25) if laplacian else (0.25, 0.25), 0.5,
                    coefficients=strategy.coefficients(1))
    good, bad = states[1].shared, poisoned(states[2].shared, fault)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        state, metrics, _ = rules[0].step(states[0], task, {1: good, 2: bad})
    expected, expected_metrics, _ = rules[0].step(states[0], task.without([2]), {1: good})

    warnings = records(caplog)
    assert len(warnings) == 1 and "partition 0 dropped neighbours 2:" in warnings[0]
    assert metrics == {**expected_metrics, "neighbours_dropped": 1.0}
    for group, tensors in expected.tensors.items():
        for key, value in tensors.items():
            assert torch.equal(state.tensors[group][key], value), (group, key)
            assert bool(torch.isfinite(state.tensors[group][key]).all())


def test_the_magnitude_guard_keeps_a_large_p_merge_from_following_one_neighbour(tmp_path):
    # p = 15 (the largest candidate) and a neighbour 10^4 times larger than the node: without
    # the guard the power mean would sit near that neighbour's values.
    config = make_config(tmp_path, "hyperprism-fixed-p3", num_nodes=3, fixed_p=15.0,
                         lr=1e-9, max_neighbour_ratio=1000.0)
    _, rules = nodes_for(config)
    state = rules[0].init_state()
    generator = torch.Generator().manual_seed(0)  # logistic regression starts at zero
    state.tensors["shared"] = {k: torch.randn(v.shape, generator=generator)
                               for k, v in state.shared.items()}
    huge = {k: 1e4 * v for k, v in state.shared.items()}
    task = NodeTask(1, (1,), (0.5,), 0.5)
    after, metrics, _ = rules[0].step(state, task, {1: huge})
    assert metrics["neighbours_dropped"] == 1.0
    scale = max(float(v.abs().max()) for v in state.shared.values())
    assert max(float(v.abs().max()) for v in after.shared.values()) < 2 * scale
    lenient = ALGORITHMS["hyperprism"].make_rule(config.replace(max_neighbour_ratio=1e5), 0)
    followed, _, _ = lenient.step(state, task, {1: huge})
    assert max(float(v.abs().max()) for v in followed.shared.values()) > 1000 * scale


class CorruptingGrid(LocalGrid):
    """Replaces the model routed from ``source`` to ``target`` by a poisoned one."""

    def __init__(self, *args, source: int, target: int, fault: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source, self.target, self.fault = source, target, fault

    def push_messages(self, messages):
        messages = list(messages)
        key = f"{NEIGHBOUR_PREFIX}{self.source}"
        for msg in messages:
            pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
            if pid == self.target and key in msg.content.array_records:
                model = msg.content[key].to_torch_state_dict()
                msg.content[key] = ArrayRecord(poisoned(model, self.fault))
        return super().push_messages(messages)


# Per row, partition 0's drops of partition 1's model on a complete graph of 4 nodes, over 4
# nodes: every exchange routes it, except where nothing is routed yet (ADOM+ and Mudag start
# with nothing to mix); Mudag's rows count its K = 3 FastMix exchanges per round.
DROPS_PER_ROW = {"hyperprism": [0.25] * 4, "mudag": [0.0] + [0.75] * 3, "adom": [0.0] + [0.25] * 3}


@pytest.mark.parametrize(("algorithm", "fault"), [("hyperprism", "nan"), ("hyperprism", "huge"),
                                                  ("hyperprism", "missing"), ("mudag", "nan"),
                                                  ("adom", "huge")])
def test_poisoned_messages_through_the_client_app_never_reach_the_model(tmp_path, caplog,
                                                                          algorithm, fault):
    config = RunConfig(algorithm=algorithm, num_nodes=4, num_rounds=3, density=1.0,
                       eval_size=500, output_dir=str(tmp_path), run_name="run",
                       node_wait_timeout=5.0)
    grid = CorruptingGrid(make_client_app(), {1000 + pid: (pid, 4) for pid in range(4)},
                          source=1, target=0, fault=fault)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run(grid, config)
    rows = metrics_rows(tmp_path / "run")
    assert [r["nodes_replied"] for r in rows] == [4] * 4
    assert [r["neighbours_dropped_mean"] for r in rows] == DROPS_PER_ROW[algorithm]
    assert all(math.isfinite(r["accuracy_mean"]) and math.isfinite(r["loss_mean"]) for r in rows)
    if algorithm == "hyperprism":
        assert rows[-1]["accuracy_mean"] > 0.3
    warnings = [m for m in records(caplog) if "dropped neighbours 1:" in m]
    assert len(warnings) == 4 * sum(DROPS_PER_ROW[algorithm])  # one per dropping round-trip


# --- failing nodes: logged, their last model stays routed, the run goes on -----------------


class FaultyGrid(LocalGrid):
    """Nodes that fail (error reply) or stay silent (no reply) in given round-trips."""

    def __init__(self, *args, failing: dict[int, set[int]], silent: dict[int, set[int]],
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failing, self.silent = failing, silent
        self.routed: list[tuple[int, int, dict]] = []  # (round, receiver, {sender: record})

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
            round_ = train_round(msg)
            if round_ is None:
                ids.extend(super().push_messages([msg]))
                continue
            self.routed.append((round_, pid, {
                int(k[len(NEIGHBOUR_PREFIX):]): v for k, v in msg.content.array_records.items()
                if k.startswith(NEIGHBOUR_PREFIX)}))
            if round_ in self.silent.get(pid, ()):
                stamp(msg, message_id=f"silent-{round_}-{pid}")
                ids.append(msg.metadata.message_id)  # never answered
            elif round_ in self.failing.get(pid, ()):
                [mid] = super().push_messages([msg])
                self.replies[mid] = Message(Error(2, "injected failure"), reply_to=msg)
                stamp(self.replies[mid], src_node_id=msg.metadata.dst_node_id)
                ids.append(mid)
            else:
                ids.extend(super().push_messages([msg]))
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_failing_and_silent_nodes_do_not_stop_the_run(tmp_path, caplog, algorithm):
    config = config_of(algorithm, num_nodes=4, num_rounds=5, density=1.0,
                       eval_size=500, output_dir=str(tmp_path), run_name="run",
                       round_timeout=0.3, node_wait_timeout=5.0, mudag_max_gossip=2)
    grid = FaultyGrid(make_client_app(), {1000 + pid: (pid, 4) for pid in range(4)},
                      failing={2: {2, 3, 4}}, silent={3: {3}})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run(grid, config)
    rows = metrics_rows(tmp_path / "run")
    # row r is round-trip r + 1: partition 2 fails in round-trips 2-4, partition 3 is silent in 3
    assert [r["nodes_replied"] for r in rows] == [4, 3, 2, 3, 4, 4]
    assert all(math.isfinite(r["accuracy_mean"]) for r in rows)
    errors = records(caplog, logging.ERROR)
    assert sum("(partition 2) failed: injected failure" in m for m in errors) >= 3
    assert any("no reply within round-timeout=0.3s from partition 3" in m for m in errors)
    if algorithm == "local":  # no communication: no model is ever routed
        assert not any(sent for _, _, sent in grid.routed)
        return
    # while partition 2 fails, its neighbours get the last model it sent (round-trip 1)
    routed_from_2 = [(r, sent[2].to_torch_state_dict()) for r, _, sent in grid.routed
                     if 2 in sent]
    first = next(model for r, model in routed_from_2 if r == 2)
    assert all(same(model, first) for r, model in routed_from_2 if 2 <= r <= 4)
    assert not any(same(model, first) for r, model in routed_from_2 if r == 6)


@pytest.mark.slow
def test_a_raising_and_a_hanging_client_app_in_a_real_simulation(tmp_path, caplog):
    config = RunConfig(num_nodes=4, num_rounds=5, density=1.0, eval_size=500, momentum=0.5,
                       output_dir=str(tmp_path), run_name="ray", round_timeout=4.0,
                       node_wait_timeout=120.0, node_batching=False)

    def faults(msg: Message, context: Context, call_next):
        round_ = train_round(msg)
        if round_ is not None:
            pid = context.node_config["partition-id"]
            if pid == 2 and round_ in (2, 3, 4):
                raise RuntimeError("injected failure")
            if pid == 3 and round_ == 3:
                time.sleep(8.0)  # past round-timeout
        return call_next(msg, context)

    with caplog.at_level(logging.INFO, logger="flwr"):
        run_simulation(
            server_app=make_server_app(config), client_app=make_client_app([faults]),
            num_supernodes=config.num_nodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"logging_level": "ERROR", "log_to_driver": False}})
    rows = metrics_rows(tmp_path / "ray")
    assert len(rows) == config.num_rounds + 1
    assert [r["nodes_replied"] for r in rows] == [4, 3, 2, 3, 4, 4]
    assert rows[-1]["accuracy_mean"] > 0.5


# --- interrupt, resume: same metrics -----------------------------------------------------


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("variant", [*sorted(ALGORITHMS), "hyperprism-hypernetwork"])
def test_a_resumed_run_reproduces_the_uninterrupted_metrics(tmp_path, variant):
    algorithm, changes = variant_of(variant)
    # node after node (no batching), so that an interruption leaves some nodes a step ahead
    config = config_of(algorithm, num_nodes=4, num_rounds=4, eval_size=500,
                       momentum=0.5, output_dir=str(tmp_path), node_wait_timeout=5.0,
                       mudag_max_gossip=2, state_dir=str(tmp_path / "node-state"),
                       node_batching=False, **changes)
    make_rule = ALGORITHMS[config.algorithm].make_rule
    run_in_process(round_loop(config, tmp_path / "clean"))
    clean = metrics_rows(tmp_path / "clean")

    def interrupting_rule(cfg, pid):
        rule = make_rule(cfg, pid)
        step = rule.step

        def stop_in_round_3(state, task, neighbours):
            if task.round == 3 and pid == 2:  # nodes 0 and 1 have done round-trip 3 already
                raise Interrupted
            return step(state, task, neighbours)

        rule.step = stop_in_round_3
        return rule

    with pytest.raises(Interrupted):
        run_in_process(round_loop(config, tmp_path / "again"), make_rule=interrupting_rule)
    assert len(metrics_rows(tmp_path / "again")) == 2
    with pytest.raises(FileExistsError, match="pass resume=true"):  # never overwritten
        run_in_process(round_loop(config, tmp_path / "again"))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.01 -> 0.1\)"):
        run_in_process(round_loop(config.replace(resume=True, lr=0.1), tmp_path / "again"))
    run_in_process(round_loop(config.replace(resume=True), tmp_path / "again"))
    assert metrics_rows(tmp_path / "again") == clean

    # the Flower path: a run stopped by a failing grid, then a fresh federation (new contexts)
    class StoppingGrid(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(train_round(m) == 3 for m in messages):
                raise Interrupted
            return super().push_messages(messages)

    partitions = {1000 + pid: (pid, 4) for pid in range(4)}
    flower = config.replace(run_name="flower")
    with pytest.raises(Interrupted):
        run(StoppingGrid(make_client_app(), partitions), flower)
    run(LocalGrid(make_client_app(), partitions), flower.replace(resume=True))
    assert metrics_rows(tmp_path / "flower") == clean


def test_without_node_checkpoints_a_resumed_run_restarts_nodes_from_their_routed_models(
        tmp_path, caplog):
    # D-PSGD without momentum: a node's whole state is its model, which the orchestrator
    # checkpoints, so even without node checkpoints the metrics are those of a clean run.
    config = RunConfig(algorithm="dpsgd", num_nodes=4, num_rounds=4, eval_size=500,
                       output_dir=str(tmp_path), node_wait_timeout=5.0, node_batching=False)
    run_in_process(round_loop(config, tmp_path / "clean"))

    class StoppingGrid(LocalGrid):
        def push_messages(self, messages):
            if any(train_round(m) == 3 for m in messages):
                raise Interrupted
            return super().push_messages(messages)

    partitions = {1000 + pid: (pid, 4) for pid in range(4)}
    with pytest.raises(Interrupted):
        run(StoppingGrid(make_client_app(), partitions), config.replace(run_name="flower"))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run(LocalGrid(make_client_app(), partitions),
            config.replace(run_name="flower", resume=True))
    assert metrics_rows(tmp_path / "flower") == metrics_rows(tmp_path / "clean")
    restarts = [m for m in records(caplog) if "restarts from the model the orchestrator" in m]
    assert len(restarts) == 4  # every node once, in the first resumed round-trip


# --- configuration errors that need the federation: before round 1, with the fix --------


@pytest.mark.parametrize(("changes", "message"), [
    ({"dataset": "mnist", "data_dir": "{tmp}"},
     r"partition \d \(node 100\d\) cannot start: FileNotFoundError: dataset 'mnist' not found "
     r"under data-dir=.*set download=true"),
    ({"min_partition_size": 10_000},
     r"cannot start: ValueError: cannot give 4 partitions at least min-partition-size=10000 "
     r"samples each from 30000 samples; lower num-nodes or min-partition-size"),
    ({"alpha": 0.001, "min_partition_size": 7000},
     r"cannot start: ValueError: Dirichlet partition .* lower min-partition-size, raise alpha"),
    ({"device": "cuda:7"},  # the suite hides CUDA devices (conftest): no machine has this one
     r"cannot start: ValueError: device='cuda:7', but this machine has 0 CUDA device"),
])
def test_nodes_that_cannot_load_their_data_or_device_stop_the_run_before_round_1(
        tmp_path, changes, message):
    changes = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
               for k, v in changes.items()}
    config = RunConfig(num_nodes=4, output_dir=str(tmp_path), run_name="run",
                       node_wait_timeout=5.0, **changes)
    grid = FaultyGrid(make_client_app(), {1000 + pid: (pid, 4) for pid in range(4)},
                      failing={}, silent={})
    with pytest.raises(RuntimeError, match=message):
        run(grid, config)
    assert grid.routed == []  # no train message was sent


def test_too_few_supernodes_are_reported_while_waiting_then_time_out(caplog):
    grid = LocalGrid(make_client_app(), {5: (0, 3), 6: (1, 3)})
    with caplog.at_level(logging.INFO, logger="flwr"), \
            pytest.raises(RuntimeError, match=r"partitions 2 of num-nodes=3 have no node: "
                          r"2 node\(s\) host 2 partitions .*start more SuperNodes"):
        wait_for_partitions(grid, 3, timeout=0.5, report_every=0.1)
    assert any("waiting for nodes: 2 of num-nodes=3 partitions hosted" in m
               for m in records(caplog, logging.INFO))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- a node whose own model diverges rolls back; nothing non-finite reaches an output -------

GOSSIP_VARIANTS = ["hyperprism", "hyperprism-fixed-p3", "hyperprism-fixed-p3-cta",
                   "hyperprism-hypernetwork", "dpsgd", "dpsgd-cta", "swarmsgd"]


def diverging_rules(config: RunConfig, partition: int, at_call: int):
    """``make_rule`` for run_in_process: ``partition``'s learner returns an all-NaN model and
    loss from its ``at_call``-th training on (its momentum would carry the NaN on)."""
    spec = ALGORITHMS[config.algorithm]

    def make_rule(config: RunConfig, pid: int):
        rule = spec.make_rule(config, pid)
        if pid == partition:
            train, calls = rule.learner.train, [0]

            def nan_train(model, gen):
                calls[0] += 1
                update = train(model, gen)
                if calls[0] < at_call:
                    return update
                return dataclasses.replace(
                    update, model={k: torch.full_like(v, math.nan) if v.is_floating_point()
                                   else v for k, v in update.model.items()},
                    metrics={"train_loss": math.nan})

            rule.learner.train = nan_train
        return rule

    return make_rule


@pytest.mark.parametrize("variant", GOSSIP_VARIANTS)
def test_a_diverging_node_rolls_back_and_is_counted(tmp_path, caplog, variant):
    config = make_config(tmp_path, variant, num_nodes=4, num_rounds=4, density=1.0, fixed_p=9.0)
    loop = round_loop(config, tmp_path / variant)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rows = run_in_process(loop, make_rule=diverging_rules(config, 2, at_call=3))
    # training of round-trip 3 (and 4) diverged: rows 2 and 3 (a row is the model after the
    # round-trip's merge, the last one does not train)
    assert [row["partitions_diverged"] for row in rows] == [[], [], [2], [2], []]
    warnings = records(caplog)
    assert any("round 3: partition 2 diverged (training:" in w for w in warnings)
    for row in rows:
        for key, value in row.items():
            if key.endswith("_mean") or key.endswith("_std"):
                assert math.isfinite(value), (row["round"], key)
        assert row["neighbours_dropped_mean"] == 0.0  # it never sent a non-finite model
    assert all(bool(torch.isfinite(v).all()) for v in loop.routing.latest[2].values())
    summary = json.loads((tmp_path / variant / "summary.json").read_text())
    assert summary["partitions_diverged"] == {"2": [2, 3]}
    assert summary["complete"] is True
    if variant == "hyperprism-fixed-p3" or variant == "hyperprism-hypernetwork":
        # the merge after a divergence is linear; the other nodes keep their degree
        assert rows[3]["p_phi"]["2"] == 1.0 and rows[3]["p_phi"]["1"] > 1.0


@pytest.mark.parametrize("variant", GOSSIP_VARIANTS)
def test_a_finite_blow_up_under_the_growth_limit_is_caught_by_its_loss(tmp_path, caplog, variant):
    # The CNN at lr 0.3 (RESULTS.md): a node's training blew up to a finite model under the
    # 1000x growth limit; it passed, and the neighbours whose merges held it blew up in turn
    # and rolled back to those merges, so nothing recovered.
    config = make_config(tmp_path, variant, num_nodes=3, fixed_p=3.0)
    plan, rules = nodes_for(config)
    states = spread_states(rules)
    task = NodeTask(2, (1, 2), (0.25, 0.25), 0.5, coefficients=plan.coefficients(2))
    neighbours = {j: states[j].shared for j in (1, 2)}
    own = rules[0].full_model(states[0].shared)
    pending = rules[0].begin(states[0], task, neighbours, rules[0].generator(task))
    start = pending.train_from
    ceiling = config.max_train_loss_ratio * math.log(10)  # ten classes
    blown = LocalUpdate({k: 50 * v if v.is_floating_point() else v for k, v in start.items()},
                        {"train_loss": 1.01 * ceiling}, {n: torch.zeros_like(start[n])
                                                         for n in rules[0].learner.names})
    assert divergence_fault(start, blown.model, blown.metrics, config.max_neighbour_ratio) is None

    with caplog.at_level(logging.WARNING, logger="flwr"):
        state, metrics, _ = pending.finish(blown)
    assert metrics["diverged"] == 1.0 and "train_loss" not in metrics
    assert any("round 2: partition 0 diverged (training: train_loss" in w for w in records(caplog))
    # it keeps its model from before the round-trip: not the blow-up, nor the merge (atc)
    kept = rules[0].model_of(state.shared)
    assert all(torch.equal(kept[k], own[k]) for k in kept)
    if config.order == "atc":
        assert any(not torch.equal(start[k], own[k]) for k in rules[0].learner.names)

    # the same model with a loss under the ceiling is a trained model
    fine = dataclasses.replace(blown, metrics={"train_loss": 0.99 * ceiling})
    pending = rules[0].begin(states[0], task, neighbours, rules[0].generator(task))
    _, metrics, _ = pending.finish(fine)
    assert "diverged" not in metrics and metrics["train_loss"] == fine.metrics["train_loss"]


@pytest.mark.parametrize("variant", ["hyperprism", "hyperprism-tracking"])
def test_a_node_whose_first_training_diverges_still_routes_its_tracker(tmp_path, variant):
    # Its neighbours expect a gradient tracker with every model (the rider of p-modes descent
    # and tracking) and would drop one without it as malformed; a node that has never
    # trained routes the mix of its neighbours' trackers (zero before the first mix).
    config = make_config(tmp_path, variant, num_nodes=4, num_rounds=3, density=1.0)
    rows = run_in_process(round_loop(config, tmp_path / variant),
                          make_rule=diverging_rules(config, 2, at_call=1))
    assert [row["partitions_diverged"] for row in rows] == [[2], [2], [2], []]
    assert [row["neighbours_dropped_mean"] for row in rows] == [0.0] * 4


def test_result_arrays_average_the_finite_final_models_only(tmp_path, caplog):
    config = make_config(tmp_path, "dpsgd", num_nodes=3)
    loop = round_loop(config, tmp_path / "dpsgd")
    run_in_process(loop)
    models = {pid: {"w": torch.full((2,), float(pid)), "n": torch.tensor(pid)} for pid in range(3)}
    models[1]["w"][0] = math.nan
    final = {pid: ArrayRecord(m) for pid, m in models.items()}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        average = finite_average(final, loop.store).to_torch_state_dict()
    assert torch.equal(average["w"], torch.tensor([1.0, 1.0]))  # partitions 0 and 2
    assert any("partitions [1] are not finite" in w for w in records(caplog))
    summary = json.loads((tmp_path / "dpsgd" / "summary.json").read_text())
    assert summary["complete"] is False and summary["partitions_nonfinite_final"] == [1]

    never_nan = finite_average({1: ArrayRecord(models[1])}, loop.store)
    assert len(never_nan) == 0  # never an all-NaN model


@pytest.mark.parametrize("variant", ["mudag", "adom"])
def test_a_gradient_method_whose_state_diverges_keeps_its_last_state(tmp_path, caplog, variant):
    config = make_config(tmp_path, variant, num_nodes=4, num_rounds=4, density=1.0)
    spec = ALGORITHMS[config.algorithm]

    def make_rule(config: RunConfig, pid: int):
        rule = spec.make_rule(config, pid)
        if pid == 2:
            gradient, calls = rule.learner.gradient, [0]

            def nan_gradient(params, gen):
                calls[0] += 1
                metrics, grads = gradient(params, gen)
                if calls[0] < 3:
                    return metrics, grads
                return {"train_loss": math.nan}, {k: torch.full_like(v, math.nan)
                                                  for k, v in grads.items()}

            rule.learner.gradient = nan_gradient
        return rule

    loop = round_loop(config, tmp_path / variant)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rows = run_in_process(loop, make_rule=make_rule)
    assert any(2 in row["partitions_diverged"] for row in rows)
    assert any("partition 2 diverged" in w for w in records(caplog))
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if k.endswith(("_mean", "_std")))
        assert row["neighbours_dropped_mean"] == 0.0
    assert all(bool(torch.isfinite(v).all()) for v in loop.routing.latest[2].values())
