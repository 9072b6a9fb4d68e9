"""Load probe: how time, memory and message bytes grow with the number of nodes.

Runs `flwr run <repo> --stream` (Flower's Simulation Runtime on a private local SuperLink, one
virtual SuperNode per node) for each node count and algorithm, and prints one row each: wall
time of the command, seconds per round (from metrics.jsonl), the peak memory of every process
the run started (SuperLink, flwr-simulation with the ServerApp, Ray's GCS/raylet and the
ClientApp actors, the `flwr` CLI), and the bytes the orchestrator routes per round. Measures
and prints; asserts nothing.

    python -m simulations.load_probe --nodes 20 50 100 --algorithms hyperprism dpsgd \\
        --rounds 5 --repeat 2 dataset=mnist data-dir=/abs/path/to/shared/data

Memory is sampled every ``--interval`` s (default 0.5) from /proc: the summed PSS
(``/proc/<pid>/smaps_rollup``; shared pages split between the processes that map them, so the
sum counts each page once) and the summed RSS (counts shared pages once per process, an upper
bound) of all processes whose environment has the run's private FLWR_HOME (every process the
run starts inherits it, even those re-parented to PID 1). Other load on the machine perturbs
the timings: repeat and take the best.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "RAY_USAGE_STATS_ENABLED": "0"}
MIB = 1024 * 1024


# --- processes and their memory (from /proc) ------------------------------------------------


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs (not this process, no zombies) whose environment has ``key=value``."""
    needle = f"{key}={value}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (needle in (proc / "environ").read_bytes().split(b"\0")
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in bytes; (0, 0) when it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def process_name(pid: int) -> str:
    """A short name: the script or Ray process (``flower-superlink``, ``ray::ClientAppActor``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    scripts = [w for w in words[:3] if not w.startswith("-")]
    name = Path(scripts[1] if len(scripts) > 1 and "python" in Path(scripts[0]).name
                else scripts[0]).name
    return name


class MemorySampler(threading.Thread):
    """Samples the summed RSS and PSS of ``pids()`` every ``interval`` s until ``stop()``.

    ``peak_pss`` / ``peak_rss`` are the largest sums seen (bytes), ``at_peak`` the PSS per
    process name (with the number of such processes) at the PSS peak, ``max_processes`` the
    most processes seen at once.
    """

    def __init__(self, pids: Callable[[], Sequence[int]], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak_pss = self.peak_rss = self.max_processes = 0
        self.at_peak: dict[str, int] = {}
        self.samples = 0
        self._done = threading.Event()

    def sample(self) -> None:
        pids = list(self.pids())
        memory = {pid: memory_of(pid) for pid in pids}
        rss = sum(r for r, _ in memory.values())
        pss = sum(p for _, p in memory.values())
        self.samples += 1
        self.max_processes = max(self.max_processes, len(pids))
        self.peak_rss = max(self.peak_rss, rss)
        if pss > self.peak_pss:
            self.peak_pss = pss
            by_name: dict[str, list[int]] = {}
            for pid, (_, p) in memory.items():
                count_pss = by_name.setdefault(process_name(pid), [0, 0])
                count_pss[0] += 1
                count_pss[1] += p
            self.at_peak = {f"{name} x{count}": pss for name, (count, pss) in by_name.items()}

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def stop_processes(pids: Callable[[], Sequence[int]], grace: float = 15.0) -> None:
    """SIGTERM ``pids()``, then SIGKILL what is still there after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pids():
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- what the orchestrator routes -----------------------------------------------------------


def routed_bytes(overrides: dict[str, str], num_nodes: int, algorithm: str, rounds: int,
                 supernodes: int | None = None) -> dict[str, float]:
    """Bytes the orchestrator routes per round (mean over rounds 1..rounds), without Flower.

    Builds the orchestrator's real train message contents (``routing.train_contents`` on the
    graphs of rounds 1..rounds, one message per SuperNode, partition p on SuperNode
    p % ``supernodes`` (default: one per partition), every routed model the size of the
    initial model) and sums them serialized as protobuf: the routed neighbour models dominate.
    Also the size of one model and of one node's state (what its ``context.state`` holds).
    """
    from flwr.app import ConfigRecord
    from flwr.common.serde import recorddict_to_proto

    from flwr_hyperprism.messages.protocol import RUN_KEY, SESSION_KEY, run_record
    from flwr_hyperprism.orchestration.routing import RoutingTable, train_contents
    from flwr_hyperprism.server.app import initial_model
    from flwr_hyperprism.setup.config import RunConfig
    from strategies import algorithm_spec

    config = RunConfig.from_run_config({**_typed(overrides), "num-nodes": num_nodes,
                                        "algorithm": algorithm, "num-rounds": rounds})
    spec = algorithm_spec(algorithm)
    plan, routing, model = spec.plan(config), RoutingTable(), initial_model(config)
    routing.start(model, num_nodes)
    records = {RUN_KEY: run_record(config), SESSION_KEY: ConfigRecord({"run-key": ""}),
               "config": ConfigRecord()}
    per_round, links = [], []
    for round_ in range(1, rounds + 1):
        tasks = routing.tasks(plan, round_, 0)
        # steady state: every node holds its state and the run config
        contents = train_contents(tasks, {pid: pid % (supernodes or num_nodes) for pid in tasks},
                                  routing, records, ConfigRecord(), tasks, tasks, report=False)
        per_round.append(sum(recorddict_to_proto(content).ByteSize()
                             for content in contents.values()))
        links.append(sum(len(task.neighbours) for task in tasks.values()))
    state = spec.make_rule(config, 0).init_state()
    state_bytes = sum(t.numel() * t.element_size() for group in state.tensors.values()
                      for t in group.values())
    model_bytes = recorddict_to_proto(_record(model)).ByteSize()
    return {"train_msg_mib_per_round": sum(per_round) / len(per_round) / MIB,
            "routed_models_per_round": sum(links) / len(links),
            "reply_mib_per_round": num_nodes * model_bytes / MIB,
            "model_kib": model_bytes / 1024, "node_state_kib": state_bytes / 1024}


def _record(arrays):
    from flwr.app import RecordDict

    return RecordDict({"arrays": arrays})


def _typed(overrides: dict[str, str]) -> dict:
    """key=value strings typed as Flower types the run config (TOML values)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([" ".join(f"{k}={v}" for k, v in overrides.items())])


# --- one run --------------------------------------------------------------------------------


def run_once(num_nodes: int, algorithm: str, rounds: int, overrides: dict[str, str],
             num_cpus: float = 1.0, interval: float = 0.5, timeout: float = 1800.0,
             supernodes: int | None = None) -> dict:
    """`flwr run` one configuration on a private local SuperLink; its numbers.

    ``supernodes``: the simulation's SuperNodes (default: one per node; fewer host the
    partitions as node groups)."""
    work = Path(tempfile.mkdtemp(prefix="hp-load-"))
    home, ray_tmp = work / "flwr-home", Path(tempfile.mkdtemp(prefix="hp-ray-"))
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home), "RAY_TMPDIR": str(ray_tmp),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    settings = {**overrides, "num-nodes": str(num_nodes), "algorithm": f"'{algorithm}'",
                "num-rounds": str(rounds), "output-dir": f"'{work / 'runs'}'",
                "run-name": "'probe'"}
    command = ["flwr", "run", str(REPO), "--stream", "--federation-config",
               f"num-supernodes={supernodes or num_nodes} client-resources-num-cpus={num_cpus:g}",
               "--run-config", " ".join(f"{k}={v}" for k, v in settings.items())]
    pids = lambda: processes_with_env("FLWR_HOME", str(home))  # noqa: E731
    sampler = MemorySampler(pids, interval)
    sampler.start()
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True,
                              timeout=timeout, check=False)
        wall = time.perf_counter() - started
    finally:
        sampler.stop()
        stop_processes(pids)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    metrics = work / "runs" / "probe" / "metrics.jsonl"
    rows = ([json.loads(line) for line in metrics.read_text().splitlines()]
            if metrics.exists() else [])
    shutil.rmtree(work, ignore_errors=True)
    if len(rows) != rounds + 1:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{num_nodes} nodes, {algorithm}: {len(rows)} rows\n{tail}")
    # Full rounds (merge, evaluate, train): rows 1..R-1. Row 0 adds the first messages' set-up;
    # row R merges and evaluates only.
    training = [r["seconds"] for r in rows[1:rounds]] or [r["seconds"] for r in rows]
    return {"nodes": num_nodes, "algorithm": algorithm, "wall_s": wall,
            "s_per_round": sum(training) / len(training),
            "s_round0": rows[0]["seconds"], "s_last": rows[-1]["seconds"],
            "nodes_replied": min(r["nodes_replied"] for r in rows),
            "accuracy": rows[-1]["accuracy_mean"],
            "peak_pss_mib": sampler.peak_pss / MIB, "peak_rss_mib": sampler.peak_rss / MIB,
            "max_processes": sampler.max_processes,
            "pss_at_peak_mib": {k: round(v / MIB) for k, v in
                                sorted(sampler.at_peak.items(), key=lambda kv: -kv[1])},
            "leftover": pids()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="run-config key=value (TOML values)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--algorithms", nargs="+", default=["hyperprism", "dpsgd"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the best is kept")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="client-resources-num-cpus")
    parser.add_argument("--supernodes", type=int, help="SuperNodes (default: one per node; "
                                                       "fewer host node groups)")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling period")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.overrides)
    for key, value in list(overrides.items()):  # quote bare words: mnist, /abs/dir
        if not value[:1].isdigit() and value not in ("true", "false") and value[:1] not in "'\"":
            overrides[key] = f"'{value}'"
    results = []
    for num_nodes in args.nodes:
        for algorithm in args.algorithms:
            runs = []
            for _ in range(args.repeat):
                runs.append(run_once(num_nodes, algorithm, args.rounds, overrides,
                                     args.num_cpus, args.interval, supernodes=args.supernodes))
                print(json.dumps(runs[-1]), flush=True)
            best = min(runs, key=lambda r: r["wall_s"])
            best["s_per_round"] = min(r["s_per_round"] for r in runs)
            best["peak_pss_mib"] = max(r["peak_pss_mib"] for r in runs)
            best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
            best.update(routed_bytes(overrides, num_nodes, algorithm, args.rounds,
                                     args.supernodes))
            results.append(best)
    print(f"\n{'nodes':>5} {'algorithm':<11} {'wall s':>7} {'s/round':>8} {'peak PSS':>9} "
          f"{'peak RSS':>9} {'procs':>5} {'routed':>7} {'train msgs':>10} {'replies':>8}")
    for r in results:
        print(f"{r['nodes']:>5} {r['algorithm']:<11} {r['wall_s']:>7.1f} "
              f"{r['s_per_round']:>8.2f} {r['peak_pss_mib']:>5.0f} MiB "
              f"{r['peak_rss_mib']:>5.0f} MiB {r['max_processes']:>5} "
              f"{r['routed_models_per_round']:>7.0f} "
              f"{r['train_msg_mib_per_round']:>6.1f} MiB {r['reply_mib_per_round']:>4.1f} MiB")
    print("(wall, s/round: best of --repeat runs, s/round = mean of the full rounds 1..R-1; "
          "peak memory: the largest of the runs; routed: neighbour models per round; "
          "train msgs / replies: their serialized bytes per round)")


if __name__ == "__main__":
    main()
