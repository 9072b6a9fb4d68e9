"""The run store: outputs, the routing checkpoint, and what a resumed run may change."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.orchestration.metrics import summarise_round
from flwr_hyperprism.orchestration.store import RoutingCheckpoint, RunStore
from flwr_hyperprism.setup.config import RunConfig

ROW = {**summarise_round(0, {0: {"accuracy": 0.5}}), "partitions_missing": [],
       "partitions_stale": [], "exchanges": 0, "seconds": 0.1}


def test_the_checkpoint_round_trips_and_resume_picks_it_up(tmp_path):
    config = RunConfig(num_nodes=2, output_dir=str(tmp_path))
    store = RunStore(tmp_path / "run")
    assert store.open(config, "D-PSGD", config.to_run_config()) is None
    assert store.run_key.startswith("run-") and len(store.run_key) == len("run-") + 8
    store.record("dpsgd", ROW, config.num_rounds)
    store.save(1, {0: {"w": torch.ones(2)}}, {0: 1}, {1: 2.0}, config)
    saved = RoutingCheckpoint.load(tmp_path / "run")
    assert saved is not None and saved.next_exchange == 1 and saved.rows == 1
    assert torch.equal(saved.latest[0]["w"], torch.ones(2)) and saved.dropped == {1: 2.0}

    again = RunStore(tmp_path / "run")
    resumed = config.replace(resume=True, round_timeout=5.0)  # allowed: computes the same
    checkpoint = again.open(resumed, "D-PSGD", resumed.to_run_config())
    assert checkpoint is not None and again.run_key == store.run_key and len(again.rows) == 1


def test_resuming_with_settings_that_change_the_computation_is_refused(tmp_path):
    config = RunConfig(num_nodes=2)
    store = RunStore(tmp_path / "run")
    store.open(config, "D-PSGD", config.to_run_config())
    store.record("dpsgd", ROW, config.num_rounds)
    store.save(1, {}, {}, {}, config)
    changed = config.replace(resume=True, lr=0.1)
    with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.1.*start a new run-name"):
        RunStore(tmp_path / "run").open(changed, "D-PSGD", changed.to_run_config())


def test_a_store_without_a_directory_writes_nothing_and_cannot_resume(tmp_path):
    store = RunStore(None)
    store.open(RunConfig(), "D-PSGD", {})
    store.save(1, {}, {}, {}, RunConfig())
    assert store.rows == [] and store.run_key.startswith("run-")
    with pytest.raises(ValueError, match="resume=true needs a run directory"):
        RunStore(None).open(RunConfig(resume=True), "D-PSGD", {})
