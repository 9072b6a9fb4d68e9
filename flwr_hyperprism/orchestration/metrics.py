"""Per-round metrics: aggregation over nodes, the log line, metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flwr_hyperprism import __version__
from flwr_hyperprism.setup.config import RunConfig

Row = dict[str, Any]
"""One metrics.jsonl row (or summary.json): JSON values by key."""

# Per-node values kept in every metrics.jsonl row, keyed by partition id: these and every
# ``server_*`` metric (a Strategy.start evaluate_fn's, per node).
PER_NODE_KEYS = ("accuracy", "p_theta", "p_phi")
DIVERGED = "diverged"  # a node's metric when its model diverged and was rolled back
# The checkout this package runs from, when it runs from one (not an installed wheel or a
# Flower app bundle).
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def code_version(source: Path = SOURCE_ROOT) -> str:
    """Which code is running: ``git <commit>`` when ``source`` is a git checkout (with
    ``+modified`` when its Python files differ from that commit), else ``flwr-hyperprism
    <version>`` of the installed package (``unknown`` without its metadata).

    Only Python files count as modified: a sweep rewrites tracked result files as it runs.
    """
    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", "-C", str(source), *args], capture_output=True,
                                  text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):  # no git on this machine
            return None

    commit = git("rev-parse", "--short=12", "HEAD") if (source / ".git").exists() else None
    if commit is not None and commit.returncode == 0:
        modified = git("diff", "--quiet", "HEAD", "--", "*.py")
        return (f"git {commit.stdout.strip()}"
                f"{'+modified' if modified is None or modified.returncode != 0 else ''}")
    return f"flwr-hyperprism {__version__}"


def numerics_platform() -> str:
    """What the float results depend on besides the code and the seed: the torch build and
    the CPU kernels it picked (``torch.backends.cpu.get_cpu_capability``: AVX2, AVX512, ...),
    e.g. ``torch 2.14.1+cu130, CPU AVX512``. Runs on two platforms may differ in the last
    bits from the first round on, and training amplifies that."""
    return f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}"


def summarise_round(round_: int, node_metrics: Mapping[int, Mapping[str, float]]) -> Row:
    """One metrics row (without ``seconds``) from each replying node's metrics.

    Every numeric key K becomes ``K_mean`` over nodes; ``PER_NODE_KEYS`` (accuracy and the
    degrees) and ``server_*`` keys also get ``K_std`` (population std over nodes) and are
    kept per node as {partition id (str, as JSON keys are): value}: a node that did not reply
    is missing there. The nodes that reported ``diverged`` are listed in
    ``partitions_diverged``.
    """
    nodes = sorted(node_metrics)
    row: Row = {"round": round_, "nodes_replied": len(nodes),
                "partitions_diverged": [n for n in nodes if DIVERGED in node_metrics[n]]}
    keys = sorted({k for m in node_metrics.values() for k in m} - {DIVERGED})
    for key in keys:
        values = {n: float(node_metrics[n][key]) for n in nodes if key in node_metrics[n]}
        mean = math.fsum(values.values()) / len(values)
        row[f"{key}_mean"] = mean
        if key in PER_NODE_KEYS or key.startswith("server_"):
            row[f"{key}_std"] = math.sqrt(math.fsum((v - mean) ** 2 for v in values.values())
                                          / len(values))
            row[key] = {str(n): v for n, v in values.items()}
    return row


def node_values(per_node: Mapping[str, float] | list[float]) -> list[float]:
    """A row's per-node values ordered by partition id (rows before per-partition keys held
    plain lists)."""
    if isinstance(per_node, Mapping):
        return [per_node[pid] for pid in sorted(per_node, key=int)]
    return list(per_node)


def format_round(row: Mapping[str, Any], num_rounds: int) -> str:
    """The per-round log line."""
    degrees = "".join(f"  {key} {row[f'{key}_mean']:.2f}" for key in ("p_theta", "p_phi")
                      if f"{key}_mean" in row)  # algorithms with power degrees only
    return (f"round {row['round']:>3}/{num_rounds}  acc {row.get('accuracy_mean', math.nan):.4f}"
            f" ± {row.get('accuracy_std', math.nan):.4f}  loss {row.get('loss_mean', math.nan):.4f}"
            f"{degrees}  nodes {row['nodes_replied']}{_listed(row, 'partitions_missing')}"
            f"{_listed(row, 'partitions_stale')}{_listed(row, 'partitions_diverged')}"
            f"  exchanges {row['exchanges']}"
            f"  {row['seconds']:.2f}s")


def _listed(row: Mapping[str, Any], key: str) -> str:
    """`` (missing [2, 5])`` for a non-empty list ``row[key]``; else nothing."""
    values = row.get(key)
    return f" ({key.removeprefix('partitions_')} {values})" if values else ""


class RunRecorder:
    """Writes ``config.json``, ``metrics.jsonl`` (a row per round) and ``summary.json``.

    A new run (``keep_rows`` None) refuses a run directory whose metrics.jsonl already has
    rows: an earlier run is never overwritten silently. A resumed run keeps the first
    ``keep_rows`` rows of its metrics.jsonl (those its checkpoint covers) and appends.
    summary.json's ``code_versions`` lists the code (``code_version``) that wrote the rows, in
    order: one entry, or more when a run was resumed by other code; ``platforms`` likewise the
    torch build and CPU kernels (``numerics_platform``) of the process that records (with
    Flower on a fleet, the SuperNodes' may differ). A resumed run whose summary.json lacks
    either list starts it with ``unknown``.
    """

    def __init__(self, run_dir: str | Path, config: RunConfig, description: str = "",
                 keep_rows: int | None = None,
                 settings: Mapping[str, object] | None = None) -> None:
        """``settings``: what config.json holds (default: the run's and its algorithm's
        settings)."""
        self.run_dir = Path(run_dir)
        self.config, self.description = config, description or config.algorithm
        self.settings = dict(settings) if settings is not None else config.to_run_config()
        metrics = self.run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if keep_rows is None and lines:
            raise FileExistsError(
                f"{self.run_dir} already holds a run ({len(lines)} rows in metrics.jsonl): "
                f"pass resume=true to continue it, or choose another run-name")
        if keep_rows is not None and len(lines) < keep_rows:
            raise ValueError(f"cannot resume {self.run_dir}: its checkpoint covers {keep_rows} "
                             f"rows but metrics.jsonl has {len(lines)}")
        self.rows: list[Row] = [json.loads(line) for line in lines[:keep_rows or 0]]
        self.nonfinite_final: list[int] = []
        # a resumed run's rows so far were written by what its summary.json names: "unknown"
        # where it names nothing (a run from before the key existed)
        earlier = self._earlier_summary() if keep_rows else {}
        unnamed = ["unknown"] if keep_rows else []
        self.code_versions = _writers_with(earlier.get("code_versions", unnamed), code_version())
        self.platforms = _writers_with(earlier.get("platforms", unnamed), numerics_platform())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(self.settings, indent=2))
        metrics.write_text("".join(json.dumps(row) + "\n" for row in self.rows))

    def _earlier_summary(self) -> Row:
        """The resumed run's summary.json (empty if it has none or cannot be read)."""
        try:
            summary = json.loads((self.run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return {}
        return summary if isinstance(summary, dict) else {}

    def record(self, row: Row) -> None:
        self.rows.append(row)
        with open(self.run_dir / "metrics.jsonl", "a") as out:
            out.write(json.dumps(row) + "\n")
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary(), indent=2))

    def summary(self) -> Row:
        summary = {**summarise_run(self.rows, self.config), "algorithm_name": self.description,
                   "code_versions": self.code_versions, "platforms": self.platforms}
        if self.nonfinite_final:
            summary.update(complete=False, partitions_nonfinite_final=self.nonfinite_final)
        return {k: v for k, v in summary.items()  # no dataset or model a run did not use
                if k not in ("dataset", "model") or k in self.settings}

    def final_models_nonfinite(self, partitions: list[int]) -> None:
        """Record partitions whose final model is not finite: the run is then not
        ``complete`` and summary.json lists them in ``partitions_nonfinite_final``."""
        self.nonfinite_final = sorted(partitions)
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary(), indent=2))


def _writers_with(earlier: list[str], running: str) -> list[str]:
    """The writers of a run's rows: ``earlier`` (those of a resumed run's rows, in order) and
    then ``running``, unless it wrote the last of them."""
    return list(earlier) if earlier[-1:] == [running] else [*earlier, running]


def summarise_run(rows: list[Row], config: RunConfig) -> Row:
    """Max accuracy (and its round) and the first round reaching the target accuracy.

    Rounds and exchanges (neighbour round-trips, several per round for Mudag) are both given.
    ``complete`` says whether every partition replied in every row, ``rows_replied`` in how
    many rows each partition (by id) replied, ``partitions_diverged`` in which rows each
    partition that ever diverged (and was rolled back) did.
    """
    accuracies = [(r["accuracy_mean"], r["round"]) for r in rows if "accuracy_mean" in r]
    best, best_round = max(accuracies, key=lambda a: (a[0], -a[1]), default=(None, None))
    reached = next((r for r in rows if "accuracy_mean" in r
                    and r["accuracy_mean"] >= config.target_accuracy), {})
    return {
        "algorithm": config.algorithm, "dataset": config.dataset, "model": config.model,
        "seed": config.seed, "num_nodes": config.num_nodes,
        "rounds_completed": rows[-1]["round"] if rows else 0,
        "exchanges_completed": rows[-1]["exchanges"] if rows else 0,
        "max_accuracy": best, "max_accuracy_round": best_round,
        "target_accuracy": config.target_accuracy,
        "rounds_to_target": reached.get("round"), "exchanges_to_target": reached.get("exchanges"),
        "seconds_total": math.fsum(r["seconds"] for r in rows),
        "complete": all(not r.get("partitions_missing") for r in rows),
        "rows_replied": {str(pid): sum(pid not in r.get("partitions_missing", ()) for r in rows)
                         for pid in range(config.num_nodes)},
        "partitions_diverged": {str(pid): [r["round"] for r in rows
                                           if pid in r.get("partitions_diverged", ())]
                                for pid in sorted({p for r in rows
                                                   for p in r.get("partitions_diverged", ())})},
    }


def default_run_dir(config: RunConfig) -> Path:
    """``<output-dir>/<run-name>``; run-name defaults to algorithm, dataset, seed and UTC time."""
    name = config.run_name or (f"{config.algorithm}-{config.dataset}-seed{config.seed}-"
                               f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    return Path(config.output_dir).expanduser().resolve() / name
