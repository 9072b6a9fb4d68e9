"""The feature-rich example through real Flower: `flwr run examples/advanced-pytorch` (slow).

Every feature of its FedAvg version must survive the switch: central evaluation, results.json
and the best model each round, the lr schedule, personal heads, the final model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.local_flower import local_superlink_env, run_flwr

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "advanced-pytorch"


@pytest.mark.slow
def test_the_advanced_example_keeps_its_features_under_flwr_run(tmp_path, monkeypatch):
    with local_superlink_env(tmp_path) as env:
        output = run_flwr([
            "run", str(EXAMPLE), "--stream",
            "--federation-config", "num-supernodes=5 client-resources-num-cpus=1",
            "--run-config", "num-server-rounds=4 lr-decay-round=3 evaluate-every=2",
        ], env, cwd=tmp_path, timeout=600)
    [run_dir] = (Path(env["FLWR_HOME"]) / "hyperprism-runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4], output[-3000:]
    assert all(row["nodes_replied"] == 5 for row in rows)  # num-nodes from the federation
    # central evaluation of every node's model in rounds 0, 2 and the last
    assert [r["round"] for r in rows if "server_accuracy" in r] == [0, 2, 4]
    assert all(len(r["server_accuracy"]) == 5 for r in rows if "server_accuracy" in r)
    # the lr schedule: row r carries the lr of round-trip r + 1's training
    assert [r.get("lr_mean") for r in rows] == [0.05, 0.05, 0.025, 0.025, None]
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
        Net().load_state_dict(torch.load(run_dir / name))
    for module in [m for m in sys.modules if m.startswith("advanced_pytorch")]:
        del sys.modules[module]
