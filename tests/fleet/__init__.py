"""A SuperLink fleet on loopback: what the fleet scenarios (one per file here) share.

Everything runs on 127.0.0.1 with free ports; every process has its own FLWR_HOME under
tmp_path, as on separate machines, and nothing touches the network. Every process started is
stopped by PID (and its SuperExec / flwr-* children by their private FLWR_HOME), also when a
check fails, and the tests assert that none is left. (The processes: tests/local_flower.py.)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHANCE = 0.1  # 10 classes


def fab_short_hash(fab: Path) -> str:
    """The 8 hex digits Flower puts in FAB file names and installed app directories."""
    return hashlib.sha256(fab.read_bytes()).hexdigest()[:8]


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} after {timeout}s"
        time.sleep(0.5)


@dataclass(frozen=True)
class BuiltApp:
    """The repo as `flwr run <repo>` ships it, and its FAB (the ``built_app`` fixture).

    Attributes
    ----------
    source : a copy of the files `flwr run` ships (`copy_app`): `flwr run <source>` runs what
        `flwr run <repo>` runs without walking the repo's .venv again (~5 s a run)
    fab : the .fab that `flwr build` makes of ``source``
    """

    source: Path
    fab: Path
