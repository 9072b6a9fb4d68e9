"""The GPU check command, on a CPU-only machine: it says so, and its comparison works."""

from __future__ import annotations

import pytest

from simulations.gpu_check import compare, main


def test_without_a_gpu_it_runs_nothing_there_and_says_so(capsys):
    assert main(["--rounds", "1", "--nodes", "3"]) == 2  # the suite hides CUDA (conftest)
    assert "no cuda device here, nothing run on it" in capsys.readouterr().out


def test_the_cpu_against_itself_agrees_and_prints_node_round_times(capsys):
    assert main(["--rounds", "1", "--nodes", "3", "--local-steps", "3", "--against", "cpu",
                 "--variants", "hyperprism-hypernetwork,mudag"]) == 0
    output = capsys.readouterr().out
    assert "hyperprism-hypernetwork: seconds per node-round: cpu" in output
    assert "mudag: seconds per node-round: cpu" in output and output.rstrip().endswith("OK")
    with pytest.raises(SystemExit):
        main(["--variants", "fedavg"])


def test_a_difference_beyond_the_tolerance_is_reported():
    rows = [{"round": 0, "accuracy_mean": 0.50, "loss_mean": 2.0}]
    shifted = [{"round": 0, "accuracy_mean": 0.53, "loss_mean": 2.0}]
    assert compare(rows, shifted, 0.02) == ["round 0: accuracy 0.5000 vs 0.5300"]
    assert compare(rows, shifted, 0.05) == []
