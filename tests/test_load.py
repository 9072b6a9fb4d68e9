"""Load (issue 5): 100 nodes complete in Flower's simulation on a 2-core machine (slow).

The base setting (logistic regression, Dirichlet alpha 0.1, density 0.5, lr 0.01, batch 128) on
the offline synthetic dataset, 100 virtual SuperNodes, 3 rounds, through Flower's Simulation
Runtime (`run_simulation`: Ray actors run the ClientApp; about 8 s faster here than `flwr run`,
which adds a SuperLink, a FAB and a flwr-simulation process but runs the same rounds). Prints
the seconds per round and the peak memory of this process and every process the run started;
asserts completion, finite accuracy and that nothing it started is left.
`python -m simulations.load_probe` measures `flwr run` for several node counts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from flwr_hyperprism.setup.config import RunConfig
from simulations.load_probe import (
    MIB,
    MemorySampler,
    process_name,
    processes_with_env,
    stop_processes,
)
from simulations.run import run_experiment

NODES, ROUNDS = 100, 3
MARKER = "HP_LOAD_TEST"  # set in this process's environment; every Ray process inherits it


def wait_until_none(pids, timeout: float = 15.0, quiet: float = 1.0) -> None:
    """Wait until ``pids()`` has been empty for ``quiet`` s (at most ``timeout`` s).

    Ray's processes exit shortly after ``ray.shutdown()``; Flower's telemetry thread (which
    runs even with telemetry off) starts a short-lived ``file -b <python>`` at the end of
    ``run_simulation`` (``platform.architecture()``), which must not count as left over.
    """
    deadline, empty_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if pids():
            empty_since = None
        elif empty_since is None:
            empty_since = time.monotonic()
        elif time.monotonic() - empty_since >= quiet:
            return
        time.sleep(0.1)


@pytest.mark.slow
def test_100_nodes_complete_in_simulation(tmp_path, monkeypatch):
    token = uuid.uuid4().hex
    ray_tmp = Path(tempfile.mkdtemp(prefix="hp-ray-"))  # short: Ray's socket paths are limited
    monkeypatch.setenv(MARKER, token)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")

    def started() -> list[int]:  # Ray's GCS, raylet, its helpers and the ClientApp actors
        return processes_with_env(MARKER, token)

    config = RunConfig(num_nodes=NODES, num_rounds=ROUNDS, output_dir=str(tmp_path),
                       run_name="load", node_wait_timeout=120.0)
    sampler = MemorySampler(lambda: [os.getpid(), *started()], interval=0.5)
    sampler.start()
    begin = time.perf_counter()
    try:
        run_dir = run_experiment(config, "flower", tmp_path / "load")
        wall = time.perf_counter() - begin
        wait_until_none(started)
    finally:
        sampler.stop()
        leftovers = {pid: process_name(pid) for pid in started()}
        stop_processes(started)  # stops them if the run failed (and after a failed check)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert sampler.max_processes > 1, "no Ray process was found: the marker did not reach them"
    assert leftovers == {}, f"processes left running after the run: {leftovers}"

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    for row in rows:
        assert row["nodes_replied"] == NODES, row
        assert math.isfinite(row["accuracy_mean"]), row
        assert len(row["accuracy"]) == NODES and all(map(math.isfinite, row["accuracy"].values()))

    seconds = ", ".join(f"{row['seconds']:.2f}" for row in rows)
    print(f"\n{NODES} nodes, {ROUNDS} rounds: {wall:.1f} s in run_simulation; seconds per round "
          f"(rows 0..{ROUNDS}) {seconds}; peak memory of {sampler.max_processes} processes "
          f"(this one + Ray's): PSS {sampler.peak_pss / MIB:.0f} MiB, RSS "
          f"{sampler.peak_rss / MIB:.0f} MiB; final accuracy {rows[-1]['accuracy_mean']:.4f}")
    print("PSS at peak (MiB): " + ", ".join(
        f"{name} {pss / MIB:.0f}" for name, pss in sorted(sampler.at_peak.items(),
                                                        key=lambda kv: -kv[1])))
