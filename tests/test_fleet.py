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
from pathlib import Path

import pytest

from tests.local_flower import (
    build_fab,
    loopback_fleet,
    make_supernode_keys,
    make_tls_files,
    offline_env,
    processes_with_home,
    run_flwr,
)

REPO = Path(__file__).resolve().parents[1]
NUM_NODES, NUM_ROUNDS = 3, 2
CHANCE = 0.1  # 10 classes
APP_FILES = {"flwr_hyperprism/server_app.py", "flwr_hyperprism/client_app.py",
             "strategies/decentralized.py"}


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
    assert min(rows[-1]["accuracy"]) > 2 * CHANCE, rows[-1]
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
         str(installed), "flwr_hyperprism.server_app:app", "flwr_hyperprism.client_app:app"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert loaded.returncode == 0, loaded.stderr
    assert all(Path(line).is_relative_to(installed) for line in loaded.stdout.split()), \
        loaded.stdout
    assert processes_with_home(home) == []
