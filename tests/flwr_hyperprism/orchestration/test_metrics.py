"""Metrics rows and run summaries."""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess

import pytest
import torch

from flwr_hyperprism.orchestration import metrics
from flwr_hyperprism.orchestration.metrics import (
    RunRecorder,
    code_version,
    format_round,
    summarise_round,
    summarise_run,
)
from flwr_hyperprism.setup.config import RunConfig


def test_round_row_has_means_population_std_and_per_node_values_by_partition():
    row = summarise_round(4, {2: {"accuracy": 0.5, "loss": 1.0, "p_phi": 3.0},
                              0: {"accuracy": 0.7, "loss": 3.0, "p_phi": 5.0}})
    assert row["round"] == 4 and row["nodes_replied"] == 2
    assert row["accuracy_mean"] == pytest.approx(0.6)
    assert row["accuracy_std"] == pytest.approx(0.1)
    assert row["loss_mean"] == pytest.approx(2.0)
    # partition 1 did not reply: it is missing, not shifted
    assert row["accuracy"] == {"0": 0.7, "2": 0.5} and row["p_phi"] == {"0": 5.0, "2": 3.0}
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


def test_rows_and_summary_say_which_partitions_replied_and_how_often(tmp_path):
    recorder = RunRecorder(tmp_path / "run", RunConfig(num_nodes=3))
    for round_, missing in enumerate([[], [2], [1, 2], []]):
        replied = {pid: {"accuracy": 0.5} for pid in range(3) if pid not in missing}
        recorder.record({**summarise_round(round_, replied), "partitions_missing": missing,
                         "partitions_stale": [2] if round_ == 2 else [],
                         "exchanges": round_, "seconds": 1.0})
    line = format_round(recorder.rows[2], 3)
    assert "nodes 1 (missing [1, 2]) (stale [2])" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] is False
    assert summary["rows_replied"] == {"0": 4, "1": 3, "2": 2}


def test_a_new_run_never_overwrites_an_existing_one_and_a_resumed_one_keeps_its_rows(tmp_path):
    config = RunConfig(num_nodes=2)
    first = RunRecorder(tmp_path / "run", config)
    for round_ in range(3):
        first.record({**summarise_round(round_, {0: {"accuracy": 0.1 * round_}}),
                      "exchanges": round_, "seconds": 1.0})
    with pytest.raises(FileExistsError, match=r"run.* already holds a run \(3 rows in "
                                              r"metrics.jsonl\): pass resume=true"):
        RunRecorder(tmp_path / "run", config)
    resumed = RunRecorder(tmp_path / "run", config.replace(resume=True), keep_rows=2)
    assert [row["round"] for row in resumed.rows] == [0, 1]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1]
    with pytest.raises(ValueError, match="checkpoint covers 5 rows but metrics.jsonl has 2"):
        RunRecorder(tmp_path / "run", config, keep_rows=5)


def test_code_version_is_the_checkouts_commit_marked_when_its_python_files_differ(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    installed = importlib.metadata.version("flwr-hyperprism")
    assert code_version(tmp_path) == f"flwr-hyperprism {installed}"  # not a checkout
    git("init", "-q")
    (tmp_path / "node.py").write_text("x = 1\n")
    (tmp_path / "summary.json").write_text("{}")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "--short=12", "HEAD")
    assert code_version(tmp_path) == f"git {commit}"
    (tmp_path / "summary.json").write_text('{"rounds_completed": 3}')  # a result, not code
    assert code_version(tmp_path) == f"git {commit}"
    (tmp_path / "node.py").write_text("x = 2\n")
    assert code_version(tmp_path) == f"git {commit}+modified"


def test_summary_lists_the_code_and_platform_that_wrote_the_rows_and_a_resume_adds_a_new_one(
        tmp_path, monkeypatch):
    config = RunConfig(num_nodes=2)

    def run(version: str, platform: str, keep_rows: int | None,
            rounds: range) -> tuple[list[str], list[str]]:
        monkeypatch.setattr(metrics, "code_version", lambda: version)
        monkeypatch.setattr(metrics, "numerics_platform", lambda: platform)
        recorder = RunRecorder(tmp_path / "run", config, keep_rows=keep_rows)
        for round_ in rounds:
            recorder.record({**summarise_round(round_, {0: {"accuracy": 0.5}}),
                             "exchanges": round_, "seconds": 1.0})
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        return summary["code_versions"], summary["platforms"]

    assert run("git aaa", "torch 1, CPU X", None, range(3)) == (["git aaa"], ["torch 1, CPU X"])
    assert run("git aaa", "torch 1, CPU X", 3, range(3, 5)) == (["git aaa"], ["torch 1, CPU X"])
    assert run("git bbb", "torch 1, CPU X", 5, range(5, 6)) == (
        ["git aaa", "git bbb"], ["torch 1, CPU X"])
    assert run("git bbb", "torch 2, CPU Y", 6, range(6, 7)) == (
        ["git aaa", "git bbb"], ["torch 1, CPU X", "torch 2, CPU Y"])
    # a run from before either list existed: who wrote its first rows is not known
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    del summary["code_versions"], summary["platforms"]
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    assert run("git bbb", "torch 2, CPU Y", 7, range(7, 8)) == (
        ["unknown", "git bbb"], ["unknown", "torch 2, CPU Y"])


def test_a_runs_summary_names_the_torch_build_and_cpu_kernels_it_ran_on(tmp_path):
    recorder = RunRecorder(tmp_path / "run", RunConfig(num_nodes=2))
    recorder.record({**summarise_round(0, {0: {"accuracy": 0.5}}), "exchanges": 0,
                     "seconds": 1.0})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["platforms"] == [
        f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}"]
