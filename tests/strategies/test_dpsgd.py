"""D-PSGD: linear gossip (and HyperPrism with p = 1, which is it bit for bit)."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.rounds import round_loop
from flwr_hyperprism.setup.config import RunConfig
from tests.variants import drive, make_config, nodes_for, spread_states


@pytest.mark.parametrize("order", ["atc", "cta"])
def test_hyperprism_with_fixed_p_1_is_dpsgd(tmp_path, order):
    # Bit for bit: the p = 1 merge is the same weighted mean in both.
    def rows(algorithm: str, **changes) -> list[dict]:
        config = RunConfig.build(algorithm, num_nodes=5, num_rounds=3, local_steps=3,
                                 order=order, **changes)
        result = run_in_process(round_loop(config))
        drop = {"seconds", "p_theta", "p_phi", "p_theta_mean", "p_phi_mean", "p_theta_std",
                "p_phi_std"}
        return [{k: v for k, v in row.items() if k not in drop} for row in result]

    assert rows("hyperprism", p_mode="fixed", fixed_p=1.0) == rows("dpsgd")


def test_complete_graph_linear_gossip_reaches_consensus_in_one_round(tmp_path,
                                                                    zero_learning_rate):
    # MH weights on the complete graph are 1/m, so one merge averages everyone.
    config = make_config(tmp_path, "dpsgd", topology="complete")
    strategy, rules = nodes_for(config)
    history = drive(strategy, rules, spread_states(rules), rounds=1)
    torch.testing.assert_close(history[1], history[0].mean(0).expand_as(history[1]), rtol=1e-5,
                               atol=1e-6)
