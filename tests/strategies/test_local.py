"""Local training: no communication, the lower bound of the decentralized tables."""

from __future__ import annotations

import torch

from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.rounds import round_loop
from flwr_hyperprism.setup.config import RunConfig
from strategies.base.node import NoExtra
from strategies.local import Local, LocalNode


def run(config: RunConfig) -> list[dict]:
    rows = run_in_process(round_loop(config))
    return [{k: v for k, v in row.items() if k not in ("seconds", "algorithm")} for row in rows]


def test_no_node_is_ever_told_of_a_neighbour(tmp_path):
    plan = Local(RunConfig(algorithm="local", num_nodes=6, num_rounds=3, density=1.0))
    for round_ in range(1, 5):
        tasks = plan.plan_round(round_, range(6))
        assert set(tasks) == set(range(6))
        assert all(not t.neighbours and t.self_weight == 1.0 for t in tasks.values())
        assert all(t.train == (round_ <= 3) for t in tasks.values())


def test_local_training_is_d_psgd_on_a_graph_without_edges(tmp_path):
    settings = {"num_nodes": 4, "num_rounds": 3, "local_steps": 2, "eval_size": 300,
                "momentum": 0.5, "output_dir": str(tmp_path)}
    alone = run(RunConfig(algorithm="local", **settings))
    edgeless = run(RunConfig(algorithm="dpsgd", density=1e-9, **settings))
    assert alone == edgeless
    assert [row["neighbours_mean"] for row in alone] == [0.0] * 4


def test_a_node_keeps_exactly_its_own_model():
    rule = LocalNode.for_partition(RunConfig(algorithm="local", num_nodes=3, eval_size=100), 1)
    own = {k: torch.randn(v.shape) for k, v in rule.learner.initial_model.items()}
    merged, _ = rule.combine([own], torch.tensor([1.0]), torch.Generator(), {}, NoExtra())
    assert all(torch.equal(merged[k], own[k]) and merged[k] is not own[k] for k in own)


def test_under_label_skew_it_stays_below_gossip(tmp_path):
    # the reason tables show it: at alpha = 0.1 a node sees few classes and cannot learn the rest
    settings = {"num_nodes": 8, "num_rounds": 4, "alpha": 0.1, "eval_size": 500,
                "output_dir": str(tmp_path)}
    alone = run(RunConfig(algorithm="local", **settings))[-1]["accuracy_mean"]
    gossip = run(RunConfig(algorithm="dpsgd", **settings))[-1]["accuracy_mean"]
    assert alone < gossip - 0.1
