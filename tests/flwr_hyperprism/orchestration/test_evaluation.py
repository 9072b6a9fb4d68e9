"""Server-side evaluation: which partitions are scored, when models are reported, the network
average of the final models and the Result."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, MetricRecord

from flwr_hyperprism.orchestration.evaluation import (
    network_average,
    reports_models,
    run_result,
    score_on_server,
    server_eval_partitions,
)
from flwr_hyperprism.setup.config import RunConfig


def test_a_sample_of_server_eval_nodes_is_seeded_and_the_same_every_round():
    config = RunConfig(num_nodes=10, server_eval_nodes=3, seed=4)
    sample = server_eval_partitions(config)
    assert len(sample) == 3 and sample == server_eval_partitions(config)
    assert server_eval_partitions(config.replace(server_eval_nodes=0)) == set(range(10))


def test_models_are_reported_every_server_eval_every_rounds_and_at_the_end():
    config = RunConfig(num_rounds=6, server_eval_every=3)
    wanted = [r for r in range(1, 8) if reports_models(config, r, 0, wants_models=True)]
    assert wanted == [1, 4, 7]
    assert [r for r in range(1, 8) if reports_models(config, r, 0, wants_models=False)] == [7]
    assert not reports_models(config, 7, 1, wants_models=True)  # stage 0 only


def test_server_scores_land_in_the_scored_nodes_metrics():
    reported = {pid: ArrayRecord({"w": torch.full((1,), float(pid))}) for pid in range(3)}
    node_metrics = {pid: {"accuracy": 0.0} for pid in range(3)}
    score_on_server(lambda r, a: MetricRecord({"acc": float(a["w"].numpy()[0]) + r}), 4,
                    reported, {0, 2}, node_metrics)
    assert node_metrics == {0: {"accuracy": 0.0, "server_acc": 4.0}, 1: {"accuracy": 0.0},
                            2: {"accuracy": 0.0, "server_acc": 6.0}}


def test_the_network_average_averages_floats_in_float64_and_keeps_counters():
    # three float32 values near the top of the range: their float32 sum would overflow
    models = {pid: ArrayRecord({"w": torch.tensor([3e38], dtype=torch.float32),
                                "n": torch.tensor(pid)}) for pid in (2, 0, 1)}
    mean = network_average(models).to_torch_state_dict()
    assert torch.equal(mean["w"], torch.tensor([3e38], dtype=torch.float32))
    assert int(mean["n"]) == 0  # from the lowest partition id


def test_the_result_holds_each_rounds_aggregates_and_the_server_means():
    rows = [{"round": 0, "accuracy_mean": 0.1, "accuracy": {"0": 0.1}, "algorithm": "x"},
            {"round": 1, "accuracy_mean": 0.2, "server_acc_mean": 0.3}]
    result = run_result(rows, ArrayRecord())
    assert result.train_metrics_clientapp[0]["accuracy.0"] == 0.1
    assert dict(result.evaluate_metrics_serverapp[1]) == {"acc": 0.3}
    assert 0 not in result.evaluate_metrics_serverapp
