"""hyperprism_mod: passes foreign messages through, drives the user's handlers (Ray-free)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flwr_hyperprism import decentralized_strategy
from flwr_hyperprism.client.mod import hyperprism_mod
from flwr_hyperprism.messages.protocol import (
    RUN_KEY,
    TASK_KEY,
    partition_key,
    run_record,
    task_record,
)
from flwr_hyperprism.setup.config import RunConfig
from strategies.base.rule import NodeTask
from tests.harness import ElasticGrid, LocalGrid, train_round
from tests.variants import metrics_rows

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "quickstart-pytorch"


def test_messages_without_its_records_reach_the_handler_untouched():
    seen = []
    app = ClientApp(mods=[hyperprism_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        return Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)

    grid = LocalGrid.with_nodes(app, 1)
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"lr": 0.1})})
    [reply] = grid.send_and_receive([Message(content, dst_node_id=1000, message_type="train")])
    assert seen == [content] and seen[0] is content
    assert reply.content["metrics"]["x"] == 1.0


@pytest.mark.parametrize("partitions", [(0, 1), (1,)])
def test_a_plug_in_node_takes_only_a_message_with_its_own_partitions_task(partitions):
    # a plug-in node hosts its node config's partition-id, never a node group
    called = []
    app = ClientApp(mods=[hyperprism_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        called.append(msg)
        return Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)

    grid = LocalGrid.with_nodes(app, 2)  # node 1000 holds partition 0
    content = RecordDict({RUN_KEY: run_record(RunConfig(num_nodes=2)),
                          **{partition_key(TASK_KEY, pid): task_record(NodeTask(1))
                             for pid in partitions}})
    [reply] = grid.send_and_receive([Message(content, dst_node_id=1000, message_type="train")])
    assert reply.has_error() and not called
    assert f"partition-id=0; the message has tasks for partitions {list(partitions)}" \
        in reply.error.reason


@pytest.fixture
def example_app(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from quickstart_pytorch import client_app, task

    yield client_app.app, task.Net
    for name in [m for m in sys.modules if m.startswith("quickstart_pytorch")]:
        del sys.modules[name]


@pytest.mark.parametrize("algorithm", ["hyperprism", "dpsgd", "swarmsgd", "mudag", "adom"])
def test_example_app_learns_in_plug_in_mode(example_app, tmp_path, algorithm):
    app, net = example_app
    grid = LocalGrid.with_nodes(app, 4, {"local-epochs": 1})
    strategy = decentralized_strategy(algorithm, num_nodes=4, lr=0.05, run_dir=tmp_path,
                                      accuracy_metric="eval_acc", loss_metric="eval_loss")
    torch.manual_seed(0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net().state_dict()),
                            train_config=ConfigRecord({"lr": 0.05}), num_rounds=4)
    assert sorted(result.train_metrics_clientapp) == list(range(5))  # num_rounds from start
    rows = [result.train_metrics_clientapp[r] for r in range(5)]
    assert [row["nodes_replied"] for row in rows] == [4] * 5
    assert all(math.isfinite(row["loss_mean"]) for row in rows)
    if algorithm != "adom":  # ADOM+ learns too slowly for 4 rounds (as natively; README)
        assert rows[-1]["loss_mean"] < rows[0]["loss_mean"] - 0.1
        assert rows[-1]["accuracy_mean"] > rows[0]["accuracy_mean"] + 0.15
    assert all("train_loss_mean" in row for row in rows[:-1])  # the user's own metric
    assert ("p_theta_mean" in rows[1]) == (algorithm == "hyperprism")
    assert rows[-1]["exchanges"] >= 4 if algorithm == "mudag" else rows[-1]["exchanges"] == 4
    assert (tmp_path / "summary.json").exists()


def test_fedavg_still_works_with_the_mod(example_app):
    app, net = example_app
    grid = LocalGrid.with_nodes(app, 3, {"local-epochs": 1})
    result = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=3).start(
        grid=grid, initial_arrays=ArrayRecord(net().state_dict()),
        train_config=ConfigRecord({"lr": 0.05}), num_rounds=2)
    assert result.arrays.to_torch_state_dict().keys() == net().state_dict().keys()
    assert result.evaluate_metrics_clientapp[2]["eval_acc"] > 0.3


@pytest.mark.parametrize("algorithm", ["hyperprism", "dpsgd"])
def test_a_plug_in_node_that_dies_and_comes_back_rejoins_from_its_routed_model(
        example_app, tmp_path, caplog, algorithm):
    app, net = example_app
    # partition 2's node dies before round-trip 2; a new one for it connects before round-trip 3,
    # is asked for its partition in round-trip 4 and bound from round-trip 5 on
    grid = ElasticGrid(app, {1000 + pid: (pid, 4) for pid in range(4)},
                       {(2, 0): [("leave", 1002)], (3, 0): [("join", 2002, 2)]},
                       {"local-epochs": 1})
    strategy = decentralized_strategy(algorithm, num_nodes=4, lr=0.05, run_dir=tmp_path,
                                      density=1.0, accuracy_metric="eval_acc",
                                      loss_metric="eval_loss")
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net().state_dict()),
                                train_config=ConfigRecord({"lr": 0.05}), num_rounds=6)
    rows = [result.train_metrics_clientapp[r] for r in range(7)]
    assert [row["nodes_replied"] for row in rows] == [4, 3, 3, 3, 4, 4, 4]
    assert all("accuracy.2" in row for row in rows[4:]) and "accuracy.2" not in rows[2]
    assert rows[-1]["accuracy.2"] > rows[0]["accuracy.2"] + 0.15
    restarts = [r.getMessage() for r in caplog.records
                if "partition 2 has no state of its own" in r.getMessage()]
    assert len(restarts) == 1


@pytest.fixture
def example_task(example_app):
    from quickstart_pytorch import task

    return task


def test_evaluate_fn_scores_every_nodes_model_of_the_round(example_app, example_task, tmp_path):
    # the paper's metric without nodes holding the test set: each device's model, scored by
    # the ServerApp's evaluate_fn; here the same global test set the nodes' handler uses, so
    # the server's and the nodes' accuracies must agree node by node
    app, net = example_app
    _, test_loader = example_task.load_data(0, 4)
    calls = []

    def evaluate_fn(server_round, arrays):
        model = net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = example_task.test(model, test_loader)
        calls.append(server_round)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    seen = []
    grid = LocalGrid.with_nodes(app, 4, {"local-epochs": 1})
    strategy = decentralized_strategy("dpsgd", num_nodes=4, lr=0.05, run_dir=tmp_path,
                                      server_eval_every=2, accuracy_metric="eval_acc",
                                      on_round=lambda row, models: seen.append((row, models)))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net().state_dict()),
                            train_config=ConfigRecord({"lr": 0.05}), num_rounds=4,
                            evaluate_fn=evaluate_fn)
    rows = metrics_rows(tmp_path)
    assert sorted(set(calls)) == [0, 2, 4] and len(calls) == 3 * 4  # every 2nd round + last
    for row in rows:
        if row["round"] in (0, 2, 4):
            assert row["server_accuracy"] == pytest.approx(row["accuracy"], abs=1e-6)
            assert row["server_accuracy_std"] >= 0
        else:
            assert "server_accuracy_mean" not in row
    assert sorted(result.evaluate_metrics_serverapp) == [0, 2, 4]
    assert result.evaluate_metrics_serverapp[4]["accuracy"] == rows[4]["server_accuracy_mean"]
    # the round callback: every row, the models in the rounds that have them
    assert [row["round"] for row, _ in seen] == [0, 1, 2, 3, 4]
    assert [sorted(models) for _, models in seen] == [[0, 1, 2, 3], [], [0, 1, 2, 3], [],
                                                      [0, 1, 2, 3]]


def test_the_result_holds_the_network_average_of_the_final_models(example_app, tmp_path):
    app, net = example_app
    grid = LocalGrid.with_nodes(app, 4, {"local-epochs": 1})
    strategy = decentralized_strategy("hyperprism", num_nodes=4, lr=0.05, run_dir=tmp_path)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(net().state_dict()),
                            train_config=ConfigRecord({"lr": 0.05}), num_rounds=2)
    finals = {pid: m.to_torch_state_dict() for pid, m in strategy.final_models.items()}
    assert sorted(finals) == [0, 1, 2, 3]
    average = result.arrays.to_torch_state_dict()
    assert average.keys() == net().state_dict().keys()  # the model, no tracker
    for key, value in average.items():
        torch.testing.assert_close(value, torch.stack([f[key] for f in finals.values()]).mean(0))
    model = net()
    model.load_state_dict(average)  # loads into the user's model as FedAvg's result does
    assert not all(torch.equal(finals[0][k], finals[1][k]) for k in average)  # no consensus


def test_server_eval_nodes_scores_a_fixed_sample(example_app, tmp_path):
    app, net = example_app
    scored = []

    def evaluate_fn(server_round, arrays):
        scored.append((server_round, arrays))
        return MetricRecord({"accuracy": 0.5})

    grid = LocalGrid.with_nodes(app, 4, {"local-epochs": 1})
    strategy = decentralized_strategy("dpsgd", num_nodes=4, lr=0.05, server_eval_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(net().state_dict()),
                   train_config=ConfigRecord({"lr": 0.05}), num_rounds=2,
                   evaluate_fn=evaluate_fn)
    assert [r for r, _ in scored] == [0, 0, 1, 1, 2, 2]


def test_settings_come_from_the_federation_and_the_train_config(example_app, monkeypatch,
                                                                 tmp_path):
    # no num_nodes, no lr, no run_dir: 5 SuperNodes' num-partitions, the train config's lr
    # per round (a schedule through train_config_fn), outputs under $FLWR_HOME
    app, net = example_app
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    seen_lr = []
    grid = LocalGrid.with_nodes(app, 5, {"local-epochs": 1})
    original = grid.push_messages

    def spy(messages):
        messages = list(messages)
        seen_lr.extend(float(m.content.config_records["config"]["lr"]) for m in messages
                       if train_round(m) is not None)
        return original(messages)

    grid.push_messages = spy
    strategy = decentralized_strategy(
        "hyperprism", train_config_fn=lambda r: ConfigRecord({"lr": 0.05 if r <= 2 else 0.02}))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(net().state_dict()),
                   train_config=ConfigRecord({"lr": 0.1}), num_rounds=3)
    assert strategy.config.num_nodes == 5
    assert seen_lr == [0.05] * 10 + [0.02] * 10  # rounds 1-2, 3-4 (the last only merges)
    [run_dir] = (tmp_path / "hyperprism-runs").iterdir()
    settings = json.loads((run_dir / "config.json").read_text())
    assert settings["mode"] == "plug-in" and settings["num-nodes"] == 5
    assert settings["lr"] == "train config 'lr', per round"
    assert not {"dataset", "model", "batch-size", "momentum"} & settings.keys()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_nodes"] == 5 and "dataset" not in summary and "model" not in summary


def test_without_an_lr_anywhere_the_run_says_where_to_set_it(example_app):
    app, net = example_app
    grid = LocalGrid.with_nodes(app, 3, {"local-epochs": 1})
    strategy = decentralized_strategy("dpsgd")
    with pytest.raises(ValueError, match="pass lr=<your optimizer's step size>"):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(net().state_dict()), num_rounds=1)


def test_native_app_settings_are_refused_in_plug_in_mode():
    with pytest.raises(ValueError, match="batch_size, dataset: settings of the native apps"):
        decentralized_strategy("dpsgd", dataset="mnist", batch_size=32)


def test_the_evaluate_handler_scores_the_model_the_node_holds(tmp_path):
    # A FedPer-style app keeps its newest head in its own state and puts it into every model it
    # is given. The evaluate message must carry the model that head belongs to: the node's
    # trained model, not the merged body of the round-trip's start.
    app = ClientApp(mods=[hyperprism_mod])
    trained: dict[int, dict[str, torch.Tensor]] = {}
    scored: dict[int, list[dict[str, torch.Tensor]]] = {}

    def with_own_head(msg: Message, context: Context) -> dict[str, torch.Tensor]:
        model = dict(msg.content["arrays"].to_torch_state_dict())
        if "head" in context.state:
            model.update(context.state["head"].to_torch_state_dict())
        return model

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = {k: v - 0.1 * (1 + context.node_config["partition-id"])
                 for k, v in with_own_head(msg, context).items()}
        context.state["head"] = ArrayRecord({"head.w": model["head.w"]})
        trained[int(context.node_config["partition-id"])] = model
        return Message(RecordDict({"arrays": ArrayRecord(model),
                                   "metrics": MetricRecord({"train_loss": 1.0})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        scored.setdefault(pid, []).append(with_own_head(msg, context))
        return Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.5})}), reply_to=msg)

    grid = LocalGrid.with_nodes(app, 3)
    strategy = decentralized_strategy("dpsgd", num_nodes=3, lr=0.1, run_dir=tmp_path,
                                      density=1.0, local_layers="head.*")
    initial = {"body.w": torch.ones(4), "head.w": torch.zeros(2)}
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=2,
                   train_config=ConfigRecord({"lr": 0.1}))
    for pid in range(3):
        assert len(scored[pid]) == 3
        after_training = scored[pid][1]  # the evaluation after round-trip 2, which trained
        for key, value in after_training.items():
            assert torch.equal(value, trained[pid][key]), (pid, key)
