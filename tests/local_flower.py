"""Run `flwr` commands against a private local SuperLink and stop every process it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def private_env(flwr_home: Path, ray_tmp: Path) -> dict[str, str]:
    """Environment for `flwr`: its own FLWR_HOME and ports, offline, Ray files in ray_tmp."""
    return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home), "RAY_TMPDIR": str(ray_tmp),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}


def processes_with_home(flwr_home: Path) -> list[int]:
    """PIDs whose environment has FLWR_HOME=flwr_home (the SuperLink, SuperExec, simulation and
    every Ray process inherit it, even after being re-parented to PID 1)."""
    needle = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0") and _alive(proc):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def stop_processes_with_home(flwr_home: Path, grace: float = 15.0) -> list[int]:
    """SIGTERM everything started under ``flwr_home``, SIGKILL what is left after ``grace``."""
    pids = processes_with_home(flwr_home)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and processes_with_home(flwr_home):
            time.sleep(0.2)
    return pids


def run_flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run `flwr ARGS`; returns stdout+stderr (the CLI exits 0 even when the ServerApp fails)."""
    done = subprocess.run(["flwr", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"flwr {' '.join(args)} exited {done.returncode}:\n{output}")
    return output


def _alive(proc: Path) -> bool:
    state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"  # a zombie is gone; its parent (or init) reaps it
