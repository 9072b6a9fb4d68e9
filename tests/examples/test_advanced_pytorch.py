"""The feature-rich example through real Flower: `flwr run examples/advanced-pytorch` (slow).

Every feature of its FedAvg version must survive the switch: central evaluation, results.json
and the best model each round, the lr schedule, personal heads, the final model. It trains the
way real apps do (SGD, lr 0.1, momentum 0.9), and HyperPrism's default degrees must do at least
as well there as plain averaging (p = 1), with no non-finite model anywhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.local_flower import local_superlink_env, run_flwr

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "advanced-pytorch"


def run_example(env: dict, cwd: Path, run_config: str) -> tuple[Path, str]:
    """``flwr run`` the example (5 SuperNodes) with ``run_config``; its run directory and
    output."""
    runs = Path(env["FLWR_HOME"]) / "hyperprism-runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    output = run_flwr([
        "run", str(EXAMPLE), "--stream",
        "--federation-config", "num-supernodes=5 client-resources-num-cpus=1",
        "--run-config", run_config,
    ], env, cwd=cwd, timeout=600)
    [run_dir] = set(runs.iterdir()) - before
    return run_dir, output


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_advanced_example_keeps_its_features_under_flwr_run(tmp_path, monkeypatch):
    settings = "num-server-rounds=4 lr-decay-round=3 evaluate-every=2"
    with local_superlink_env(tmp_path) as env:
        run_dir, output = run_example(env, tmp_path, settings)
        linear_dir, _ = run_example(env, tmp_path, f"{settings} p-mode='fixed' fixed-p=1.0")
    rows = rows_of(run_dir)
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4], output[-3000:]
    assert all(row["nodes_replied"] == 5 for row in rows)  # num-nodes from the federation
    # central evaluation of every node's model in rounds 0, 2 and the last
    assert [r["round"] for r in rows if "server_accuracy" in r] == [0, 2, 4]
    assert all(len(r["server_accuracy"]) == 5 for r in rows if "server_accuracy" in r)
    # the lr schedule: row r carries the lr of round-trip r + 1's training
    assert [r.get("lr_mean") for r in rows] == [0.1, 0.1, 0.05, 0.05, None]
    # it learns: the nodes' loss falls and the central accuracy (all ten classes) rises; the
    # nodes' own accuracy, on their three favoured classes, starts near 0.8 after round-trip 0
    assert rows[-1]["loss_mean"] < 0.5 * rows[0]["loss_mean"]
    assert rows[-1]["server_accuracy_mean"] > rows[0]["server_accuracy_mean"] + 0.1
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results] == [0, 1, 2, 3, 4]
    settings = json.loads((run_dir / "config.json").read_text())
    assert settings["mode"] == "plug-in" and settings["local-layers"] == "head.*"
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from advanced_pytorch.task import Net

    for name in ("best_model.pt", "final_model.pt"):  # models of the app's own class
        model = torch.load(run_dir / name)
        Net().load_state_dict(model)
        assert all(bool(torch.isfinite(v).all()) for v in model.values())
    # the default degrees against plain averaging (same seed, same initial model): at least
    # as accurate centrally at the end, no partition diverged, every final model finite
    linear = rows_of(linear_dir)
    assert rows[-1]["server_accuracy_mean"] >= linear[-1]["server_accuracy_mean"]
    for run in (run_dir, linear_dir):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["complete"] and summary["partitions_diverged"] == {}
    for module in [m for m in sys.modules if m.startswith("advanced_pytorch")]:
        del sys.modules[module]
