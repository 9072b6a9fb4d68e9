"""The README's main command, `flwr run .`, on a private local SuperLink (slow)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.local_flower import (
    private_env,
    processes_with_home,
    run_flwr,
    stop_processes_with_home,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flwr_run_completes_offline_and_writes_outputs(tmp_path):
    home = tmp_path / "flwr-home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="hp-ray-"))  # short: Ray's socket paths are limited
    env = private_env(home, ray_tmp)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    run_dir = tmp_path / "runs" / "main"
    try:
        # Started from tmp_path, so the SuperLink's working directory holds no project code.
        output = run_flwr([
            "run", str(REPO), "--stream",
            "--federation-config", "num-supernodes=4 client-resources-num-cpus=1",
            "--run-config", f"num-nodes=4 num-rounds=3 output-dir='{run_dir.parent}' "
                            f"run-name='main'",
        ], env, cwd=tmp_path, timeout=600)
        assert "round   3/3" in output, output[-3000:]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["round"] for row in rows] == [0, 1, 2, 3]
        assert {row["algorithm"] for row in rows} == {"hyperprism"}
        for key in ("accuracy_mean", "accuracy_std", "loss_mean", "p_theta_mean", "p_phi_mean",
                    "seconds"):
            assert all(key in row for row in rows), key
        assert rows[-1]["accuracy_mean"] > 0.5
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds_completed"] == 3 and summary["max_accuracy"] > 0.5
    finally:
        stop_processes_with_home(home)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert processes_with_home(home) == []
