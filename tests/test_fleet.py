"""Deployment: HyperPrism on a real `flower-superlink` and `flower-supernode`s (slow).

Everything runs on 127.0.0.1 with free ports; every process has its own FLWR_HOME under
tmp_path, as on separate machines, and nothing touches the network. Every process started is
stopped by PID (and its SuperExec / flwr-* children by their private FLWR_HOME), also when a
check fails, and the tests assert that none is left.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from flwr_hyperprism.setup.config import RunConfig
from simulations.run import run_experiment
from tests.local_flower import (
    build_fab,
    loopback_fleet,
    make_supernode_keys,
    make_tls_files,
    offline_env,
    processes_with_home,
    run_flwr,
)
from tests.variants import metrics_rows

REPO = Path(__file__).resolve().parents[1]
NUM_NODES, NUM_ROUNDS = 3, 2
CHANCE = 0.1  # 10 classes
APP_FILES = {"flwr_hyperprism/server/app.py", "flwr_hyperprism/client/app.py",
             "flwr_hyperprism/server/strategy.py"}


def fab_short_hash(fab: Path) -> str:
    """The 8 hex digits Flower puts in FAB file names and installed app directories."""
    return hashlib.sha256(fab.read_bytes()).hexdigest()[:8]


@pytest.mark.slow
def test_tls_fleet_with_supernode_auth_runs_hyperprism(tmp_path: Path) -> None:
    """TLS + SuperNode authentication, 3 SuperNodes, `flwr run <repo> <connection>`."""
    tls = make_tls_files(tmp_path / "tls")
    fab = build_fab(REPO, tmp_path / "fab", offline_env(tmp_path / "build-home"))
    run_dir = tmp_path / "runs" / "deployed"
    # FLWR_SUPEREXEC_TASK_POLL_INTERVAL (default 1 s) is the only polling knob of 1.41: at
    # 0.1 s rounds were not faster here (the SuperNode's fixed 3 s idle sleep and the
    # per-message flwr-clientapp start dominate), so the defaults are kept.
    with loopback_fleet(tmp_path / "fleet", NUM_NODES, tls=tls, supernode_auth=True) as fleet:
        # TLS only: a plain-HTTP request gets no answer.
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{fleet.address}/health", timeout=5)
        # Authentication is enforced: a SuperNode whose key was not registered is refused.
        rogue_key = fleet.home("rogue") / "unregistered-key"
        make_supernode_keys(rogue_key)
        rogue = fleet.start_supernode("rogue", NUM_NODES, NUM_NODES + 1, private_key=rogue_key)
        assert rogue.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in fleet.log("rogue")

        started = time.monotonic()
        output = fleet.flwr([
            "run", str(REPO), fleet.connection, "--stream",
            "--run-config", f"num-nodes={NUM_NODES} num-rounds={NUM_ROUNDS} "
                            f"node-wait-timeout=120 round-timeout=120 "
                            f"output-dir='{run_dir.parent}' run-name='{run_dir.name}'",
        ], timeout=420)
        run_seconds = time.monotonic() - started
    assert fleet.leftovers() == [], "processes left running"

    assert f"round   {NUM_ROUNDS}/{NUM_ROUNDS}" in output, output[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(NUM_ROUNDS + 1))
    for row in rows:
        assert row["nodes_replied"] == NUM_NODES, row
        assert len(row["accuracy"]) == NUM_NODES, row
    assert all("train_loss_mean" in row for row in rows[:-1])  # the last round-trip only merges
    assert rows[-1]["accuracy_mean"] > 5 * CHANCE, rows[-1]
    assert min(rows[-1]["accuracy"].values()) > 2 * CHANCE, rows[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == NUM_ROUNDS and summary["max_accuracy"] > 5 * CHANCE

    # Every SuperNode ran every round-trip (a fresh flwr-clientapp per message) and replied.
    for i in range(NUM_NODES):
        log = fleet.log(f"supernode-{i}")
        assert log.count("Receiving: train.hyperprism message") == NUM_ROUNDS + 1, log[-3000:]
        assert log.count("Sending: train.hyperprism message") == NUM_ROUNDS + 1, log[-3000:]
        assert "Failed to send" not in log
    # What ran is the FAB `flwr build` makes, installed without tests on every machine.
    for name in ["superlink", *(f"supernode-{i}" for i in range(NUM_NODES))]:
        (installed,) = (fleet.home(name) / "apps").glob(f"*.{fab_short_hash(fab)}")
        assert (installed / "flwr_hyperprism" / "client_app.py").is_file()
        assert not (installed / "tests").exists()

    per_round = [row["seconds"] for row in rows[1:]]  # round 0 also installs the FAB
    print(f"\ndeployed HyperPrism, {NUM_NODES} loopback SuperNodes, TLS + SuperNode auth: "
          f"{sum(per_round) / len(per_round):.1f} s per round (rounds 1..{NUM_ROUNDS}: "
          f"{', '.join(f'{s:.1f}' for s in per_round)} s; round 0: {rows[0]['seconds']:.1f} s); "
          f"flwr run: {run_seconds:.0f} s")


@pytest.mark.slow
def test_fab_leaves_out_tests_and_installs(tmp_path: Path) -> None:
    """`flwr build` (on a copy: nothing is written into the repo), then `flwr install`."""
    home = tmp_path / "cli-home"
    env = offline_env(home)
    fab = build_fab(REPO, tmp_path, env)
    names = set(zipfile.ZipFile(fab).namelist())
    assert {"pyproject.toml", ".info/CONTENT", *APP_FILES} <= names
    assert not [name for name in names if name.startswith("tests/")], sorted(names)

    run_flwr(["install", str(fab)], env, cwd=tmp_path, timeout=120)
    (installed,) = (home / "apps").iterdir()
    assert installed.name.endswith(f".{fab_short_hash(fab)}")
    assert not (installed / "tests").exists()
    # Flower's own loader finds both components in the installed copy.
    loaded = subprocess.run(
        [sys.executable, "-c",
         "import sys; from flwr.supercore.object_ref import load_app\n"
         "for ref in sys.argv[2:]:\n"
         "    load_app(ref, RuntimeError, sys.argv[1])\n"
         "    print(sys.modules[ref.split(':')[0]].__file__)",
         str(installed), "flwr_hyperprism.server.app:app", "flwr_hyperprism.client.app:app"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert loaded.returncode == 0, loaded.stderr
    assert all(Path(line).is_relative_to(installed) for line in loaded.stdout.split()), \
        loaded.stdout
    assert processes_with_home(home) == []


# --- a fleet that loses nodes, and a run that resumes -------------------------------------


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} after {timeout}s"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_fleet_run_survives_a_killed_and_a_terminated_supernode(tmp_path: Path) -> None:
    """SIGKILL partition 2's SuperNode and restart it (same partition and state-dir): it
    rejoins from its checkpoint. SIGTERM partition 3's SuperNode for good: the run completes
    without it."""
    num_nodes, num_rounds = 4, 7
    state = {i: tmp_path / f"state-{i}" for i in range(num_nodes)}
    run_dir = tmp_path / "runs" / "survivor"
    with loopback_fleet(tmp_path / "fleet", num_nodes,
                        node_config=lambda i: f"state-dir='{state[i]}'") as fleet:
        runner = fleet.start_flwr("flwr-run", [
            "run", str(REPO), fleet.connection, "--stream",
            "--run-config", f"num-nodes={num_nodes} num-rounds={num_rounds} max-staleness=2 "
                            f"node-wait-timeout=120 round-timeout=45 "
                            f"output-dir='{run_dir.parent}' run-name='{run_dir.name}'"])
        wait_until(lambda: len(read_rows(run_dir)) >= 2 or runner.poll() is not None, 240,
                   "no row 2")
        assert runner.poll() is None, fleet.log("flwr-run")[-3000:]
        fleet.processes["supernode-2"].kill()
        fleet.processes["supernode-2"].wait(timeout=30)
        fleet.start_supernode("supernode-2-restarted", 2, num_nodes,
                              node_config=f"state-dir='{state[2]}'")
        fleet.processes["supernode-3"].terminate()
        fleet.processes["supernode-3"].wait(timeout=30)
        assert runner.wait(timeout=600) == 0, fleet.log("flwr-run")[-3000:]
        serverapp_log = fleet.log("flwr-run")
        restarted_log = fleet.log("supernode-2-restarted")
    assert fleet.leftovers() == [], "processes left running"

    rows = read_rows(run_dir)
    assert [row["round"] for row in rows] == list(range(num_rounds + 1)), serverapp_log[-3000:]
    replied = [row["nodes_replied"] for row in rows]
    missing = [row["partitions_missing"] for row in rows]
    print(f"\nnodes replied per row: {replied}; missing: {missing}; "
          f"stale: {[row['partitions_stale'] for row in rows]}")
    assert replied[:2] == [num_nodes] * 2
    # partition 2 dips and comes back; partition 3 is gone for good
    assert any(2 in m for m in missing) and 2 not in missing[-1] and 2 not in missing[-2]
    assert all(3 in m for m in missing[3:])
    # partition 2 learns again after rejoining (from its checkpoint: the log check below). Its
    # label-skewed data alone gives about 3 x chance; with the default degrees (near-linear
    # merges, as D-PSGD) a skewed node on this sparse three-node graph catches up with the
    # others only slowly (measured: 0.31 against 0.69 three rounds after rejoining)
    assert "3" not in rows[-1]["accuracy"] and rows[-1]["accuracy"]["2"] > 2 * CHANCE
    assert all(set(row["accuracy"]) == {str(p) for p in range(num_nodes)} - set(map(str, m))
               for row, m in zip(rows, missing))
    assert 3 in rows[-1]["partitions_stale"]  # too old to route after max-staleness=2
    assert rows[-1]["accuracy_mean"] > 5 * CHANCE
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] is False and summary["rounds_completed"] == num_rounds
    assert "partition 2 moves from node" in serverapp_log or "partition 2 joins" in serverapp_log
    assert "partition 2 resumes from its checkpoint" in restarted_log, restarted_log[-3000:]


@pytest.mark.slow
def test_a_fleet_run_resumed_after_stopping_its_serverapp_has_the_uninterrupted_metrics(
        tmp_path: Path) -> None:
    num_nodes, num_rounds = 3, 4
    run_dir = tmp_path / "runs" / "resumed"
    settings = (f"num-nodes={num_nodes} num-rounds={num_rounds} momentum=0.5 eval-size=500 "
                f"node-wait-timeout=120 round-timeout=120 output-dir='{run_dir.parent}' "
                f"run-name='{run_dir.name}'")
    with loopback_fleet(tmp_path / "fleet", num_nodes,
                        node_config=lambda i: f"state-dir='{tmp_path / f'state-{i}'}'") as fleet:
        submitted = json.loads(fleet.flwr(["run", str(REPO), fleet.connection, "--format",
                                           "json", "--run-config", settings]))
        wait_until(lambda: len(read_rows(run_dir)) >= 2, 240, "no row 2")
        fleet.flwr(["stop", str(submitted["run-id"]), fleet.connection])
        wait_until(lambda: not fleet.serverapps(), 60, "the stopped ServerApp still runs")
        stopped_at = len(read_rows(run_dir))
        output = fleet.flwr(["run", str(REPO), fleet.connection, "--stream", "--run-config",
                             f"{settings} resume=true"], timeout=420)
    assert fleet.leftovers() == [], "processes left running"
    assert stopped_at < num_rounds + 1, "the run finished before it was stopped"
    assert "resuming" in output, output[-3000:]

    reference = run_experiment(RunConfig(num_nodes=num_nodes, num_rounds=num_rounds,
                                         momentum=0.5, eval_size=500,
                                         output_dir=str(tmp_path / "runs"),
                                         run_name="reference"))
    assert metrics_rows(run_dir) == metrics_rows(reference)
