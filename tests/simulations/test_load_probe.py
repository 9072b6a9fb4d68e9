"""The load probe's size accounting (what the orchestrator routes), without Flower runs."""

from __future__ import annotations

import pytest

from simulations.load_probe import routed_bytes


@pytest.mark.parametrize("algorithm", ["dpsgd", "local"])
def test_routed_bytes_counts_the_neighbour_models_of_each_round(algorithm):
    sizes = routed_bytes({}, 6, algorithm, 2)
    models = sizes["routed_models_per_round"]
    model_mib = sizes["model_kib"] / 1024
    if algorithm == "local":  # routes nothing: only tasks and run configs
        assert models == 0 and sizes["train_msg_mib_per_round"] < model_mib
    else:
        assert models > 0
        assert models * model_mib < sizes["train_msg_mib_per_round"] < (models + 1) * model_mib
    assert sizes["reply_mib_per_round"] == pytest.approx(6 * model_mib)
