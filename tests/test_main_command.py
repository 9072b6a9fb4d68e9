"""The README's main command, `flwr run .`, on a private local SuperLink (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.local_flower import local_superlink_env, run_flwr

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flwr_run_completes_offline_and_writes_outputs(tmp_path):
    run_dir = tmp_path / "runs" / "main"
    with local_superlink_env(tmp_path) as env:
        # Started from tmp_path, so the SuperLink's working directory holds no project code.
        # Flower's default federation (2 SuperNodes): each hosts 3 of the 6 partitions.
        output = run_flwr([
            "run", str(REPO), "--stream",
            "--run-config", f"num-nodes=6 num-rounds=3 output-dir='{run_dir.parent}' "
                            f"run-name='main'",
        ], env, cwd=tmp_path, timeout=600)
    assert "round   3/3" in output, output[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert all(row["nodes_replied"] == 6 for row in rows)
    assert {row["algorithm"] for row in rows} == {"hyperprism"}
    for key in ("accuracy_mean", "accuracy_std", "loss_mean", "p_theta_mean", "p_phi_mean",
                "exchanges", "seconds"):
        assert all(key in row for row in rows), key
    assert rows[-1]["accuracy_mean"] > 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["max_accuracy"] > 0.5
