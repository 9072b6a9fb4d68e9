"""Metrics rows and run summaries."""

from __future__ import annotations

import json
import math

import pytest

from flwr_hyperprism.config import RunConfig
from flwr_hyperprism.metrics import (
    RunRecorder,
    format_round,
    summarise_round,
    summarise_run,
)


def test_round_row_has_means_population_std_and_per_node_lists():
    row = summarise_round(4, {2: {"accuracy": 0.5, "loss": 1.0, "p_phi": 3.0},
                              0: {"accuracy": 0.7, "loss": 3.0, "p_phi": 5.0}})
    assert row["round"] == 4 and row["nodes_replied"] == 2
    assert row["accuracy_mean"] == pytest.approx(0.6)
    assert row["accuracy_std"] == pytest.approx(0.1)
    assert row["loss_mean"] == pytest.approx(2.0)
    assert row["accuracy"] == [0.7, 0.5] and row["p_phi"] == [5.0, 3.0]  # by partition id
    assert "loss" not in row
    assert "p_phi 4.00" in format_round({**row, "exchanges": 4, "seconds": 1.0}, 9)


def test_a_round_without_replies_still_logs_and_summarises():
    row = {**summarise_round(1, {}), "exchanges": 1, "seconds": 0.5}
    assert row["nodes_replied"] == 0 and "nan" in format_round(row, 3)
    assert "p_theta" not in format_round(row, 3)  # only algorithms with degrees show them
    summary = summarise_run([row], RunConfig())
    assert summary["max_accuracy"] is None and summary["rounds_to_target"] is None
    assert summary["exchanges_to_target"] is None and summary["exchanges_completed"] == 1


def test_recorder_writes_rows_and_the_first_round_reaching_the_target(tmp_path):
    recorder = RunRecorder(tmp_path / "run", RunConfig(target_accuracy=0.8))
    for round_, accuracy in enumerate([0.1, 0.85, 0.82, 0.9]):
        recorder.record({**summarise_round(round_, {0: {"accuracy": accuracy}}),
                         "exchanges": 4 * round_, "seconds": 1.0})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["accuracy_mean"] for line in lines] == [0.1, 0.85, 0.82, 0.9]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_to_target"] == 1 and summary["max_accuracy_round"] == 3
    assert summary["exchanges_to_target"] == 4 and summary["exchanges_completed"] == 12
    assert summary["rounds_completed"] == 3 and math.isclose(summary["seconds_total"], 4.0)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["target-accuracy"] == 0.8
