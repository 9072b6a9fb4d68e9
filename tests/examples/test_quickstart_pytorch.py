"""The converted example app through real Flower: `flwr run examples/quickstart-pytorch` (slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.local_flower import local_superlink_env, run_flwr

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart-pytorch"
ROUND_LINE = re.compile(r"\[hyperprism\] round +(\d+)/(\d+) +acc ([0-9.]+).* nodes (\d+)")


@pytest.mark.slow
def test_converted_example_learns_under_flwr_run(tmp_path):
    with local_superlink_env(tmp_path) as env:
        output = run_flwr([
            "run", str(EXAMPLE), "--stream",
            "--federation-config", "num-supernodes=6 client-resources-num-cpus=1",
            "--run-config", "num-server-rounds=4",
        ], env, cwd=tmp_path, timeout=600)
    rows = [(int(r), int(t), float(acc), int(n)) for r, t, acc, n in ROUND_LINE.findall(output)]
    assert [r for r, *_ in rows] == [0, 1, 2, 3, 4], output[-3000:]
    assert all(total == 4 and nodes == 6 for _, total, _, nodes in rows)
    assert rows[-1][2] > rows[0][2] + 0.3  # accuracy rises well above the start
