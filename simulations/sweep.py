"""Experiment sweeps: one command per table or figure of the paper.

    python -m simulations.sweep simulations/table2_alpha.yaml data_dir=/abs/data [key=value ...]
        [--engine flower|inprocess] [--seeds 0,1,2] [--method NAME ...] [--value V ...]
        [--out DIR] [--jobs N] [--report]

A sweep file names the run configs to compose (``configs``, relative to the sweep file), the
methods (rows of the table: a name and the RunConfig settings that make it), one swept key and
its values (columns), and the seeds. ``key=value`` overrides apply to every cell. Every cell
(method x value x seed) is one run; its metrics.jsonl / summary.json go to
``<out>/cells/<cell id>/`` (its config.json with directories relative to ``<out>``). A cell
whose summary says it completed all its rounds of the same config is not run again, so an
interrupted sweep resumes where it stopped; nor is one that a sweep the file names under
``reuses`` finished with the same settings (Table 2's alpha = 0.1 column is Table 3's density
= 0.5 column): that cell's results are copied. Then the sweep writes ``metrics.csv``
(every round of every cell), ``table.md`` (Max Acc and Conv. Rds, mean ± std over seeds, in the
paper's layout) and, with matplotlib installed, the plots (``simulations.plots``).
``--report`` writes those three from the cells finished so far and runs nothing;
``--method``, ``--value`` (each repeatable) and ``--seeds`` run only those rows, columns and
seeds. The table always shows every row and column, and the file's seeds and any ``--seeds``
added to them (so ``--seeds 2`` on a file of seeds [0, 1] runs seed 2 and reports all three).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

from flwr.common.logger import FLOWER_LOGGER

from flwr_hyperprism.orchestration.store import ROUTING_FILE
from flwr_hyperprism.setup.config import RunConfig

from .run import ENGINES, run_experiment
from .sweep_file import REFERENCE_METHOD, Cell, Sweep, cell_rows

log = FLOWER_LOGGER

CSV_KEYS = ("round", "exchanges", "nodes_replied", "accuracy_mean", "accuracy_std", "loss_mean",
            "p_theta_mean", "p_theta_std", "p_phi_mean", "p_phi_std", "neighbours_dropped_mean",
            "seconds")


def run_sweep(sweep: Sweep, out: Path, engine: str = "inprocess", jobs: int = 1,
              cells: Sequence[Cell] | None = None) -> list[dict]:
    """Run every unfinished cell of ``cells`` (default: all of ``sweep``'s), ``jobs`` at a time
    (separate processes; in-process engine), then write metrics.csv, table.md and the plots of
    the whole sweep; returns the summaries of its finished cells (with method, value and
    seed). A cell's metrics do not depend on ``jobs``."""
    if jobs < 1 or (jobs > 1 and engine != "inprocess"):
        raise ValueError(f"--jobs {jobs}: use an integer >= 1, and > 1 only with --engine "
                         f"inprocess (Flower simulations each start their own Ray)")
    # seed by seed, and within a seed column by column: a sweep stopped part way leaves whole
    # columns of its first seeds, which a table can compare
    cells = sorted(sweep.cells() if cells is None else cells,
                   key=lambda c: (sweep.seeds.index(c.seed), sweep.values.index(c.value)))
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo = []
    for index, cell in enumerate(cells, 1):
        run_dir = out / "cells" / cell.id(sweep.key)
        if finished(run_dir, cell.config):
            log.info("[sweep %s] cell %s of %s (%s) already done", sweep.name, index,
                     len(cells), run_dir.name)
            continue
        source = reusable_cell(sweep, out, cell.config)
        if source is not None:  # same seed and settings: the same metrics, so not run again
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            for name in CELL_FILES:
                shutil.copy2(source / name, run_dir / name)
            log.info("[sweep %s] cell %s of %s (%s): copied from %s, a finished run of the "
                     "same settings", sweep.name, index, len(cells), run_dir.name,
                     source.relative_to(out.parent))
            continue
        # the nodes checkpoint their state every round-trip, so a stopped cell continues
        config = cell.config.replace(output_dir=str(run_dir.parent), run_name=run_dir.name,
                                     state_dir=str(run_dir / NODE_STATE))
        if resumable(run_dir, cell.config):
            log.info("[sweep %s] cell %s of %s (%s) was stopped: continuing it", sweep.name,
                     index, len(cells), run_dir.name)
            config = config.replace(resume=True)
        elif run_dir.exists():  # outdated, or stopped before its nodes' first checkpoint
            log.info("[sweep %s] cell %s of %s (%s) is unfinished: starting it again",
                     sweep.name, index, len(cells), run_dir.name)
            shutil.rmtree(run_dir)
        todo.append((config, run_dir))
    started = time.perf_counter()
    with _pool(jobs) as pool:
        running = [pool.submit(run_cell, config, engine, run_dir, out)
                   for config, run_dir in todo]
        for done, future in enumerate(futures.as_completed(running), 1):
            run_dir, seconds = future.result()
            elapsed = time.perf_counter() - started
            log.info("[sweep %s] cell %s of %s (%s) done in %.0fs; ETA %.0fs", sweep.name,
                     done, len(todo), run_dir.name, seconds, elapsed / done * (len(todo) - done))
    return report(sweep, out)


def report(sweep: Sweep, out: Path) -> list[dict]:
    """Write metrics.csv, table.md and the plots from the cells in ``out`` that completed
    (a sweep still running, or stopped, gets a partial table: "—" where a cell is missing);
    returns their summaries (with method, value and seed)."""
    done = finished_summaries(sweep, out)
    cells = [cell for cell, _ in done]
    others = len([d for d in (out / "cells").glob("*") if d.is_dir()]) - len(cells)
    if others:
        log.info("[sweep %s] %s cell folder(s) in %s are unfinished or of other settings: "
                 "not in the report", sweep.name, others, out / "cells")
    summaries = [{**summary, "method": cell.method, "value": cell.value}
                 for cell, summary in done]
    write_csv(sweep, out, cells)
    (out / "table.md").write_text(markdown_table(sweep, summaries))
    try:
        from .plots import plot_sweep  # imported here: matplotlib is an optional extra
    except ModuleNotFoundError as err:  # matplotlib is the optional extra "plots"
        if err.name != "matplotlib":
            raise
        log.warning("matplotlib is not installed: no plots (pip install -e '.[plots]')")
    else:
        plot_sweep(sweep, out, cells)
    return summaries


def finished_summaries(sweep: Sweep, out: Path) -> list[tuple[Cell, dict]]:
    """The cells of ``sweep`` that finished in ``out``, each with its summary.json."""
    return [(cell, json.loads((out / "cells" / cell.id(sweep.key) / "summary.json").read_text()))
            for cell in sweep.cells() if finished(out / "cells" / cell.id(sweep.key), cell.config)]


def run_cell(config: RunConfig, engine: str, run_dir: Path, out: Path) -> tuple[Path, float]:
    """Run one cell; returns its directory and seconds."""
    started = time.perf_counter()
    run_experiment(config, engine, run_dir)
    if (run_dir / NODE_STATE).exists():  # only a stopped cell needs its nodes' checkpoints
        shutil.rmtree(run_dir / NODE_STATE)
    relative_paths(run_dir, out)
    return run_dir, time.perf_counter() - started


T = TypeVar("T")


class _InlineExecutor(futures.Executor):
    """Runs each submitted call at once, in this process (``--jobs 1``)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> futures.Future[T]:
        future: futures.Future[T] = futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _pool(jobs: int) -> futures.Executor:
    if jobs == 1:
        return _InlineExecutor()
    return futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


PATH_KEYS = ("data-dir", "output-dir", "state-dir")  # where things are, not the experiment
NODE_STATE = "node-state"  # a cell's folder of its nodes' checkpoints while it runs
CELL_FILES = ("config.json", "metrics.jsonl", "summary.json")  # a finished cell's results



def relative_paths(run_dir: Path, out: Path) -> None:
    """Rewrite the cell's config.json with its directories relative to ``out``, so committed
    results name no machine's absolute paths."""
    path = run_dir / "config.json"
    config = json.loads(path.read_text())
    for key in PATH_KEYS:
        if config.get(key) and Path(config[key]).is_absolute():
            config[key] = os.path.relpath(config[key], out)
    path.write_text(json.dumps(config, indent=2))


def reusable_cell(sweep: Sweep, out: Path, config: RunConfig) -> Path | None:
    """A finished cell of ``config``'s settings among those of the sweeps ``sweep`` reuses
    (their results beside ``out``), or None."""
    for name in sweep.reuses:
        for run_dir in sorted((out.parent / name / "cells").glob("*")):
            if finished(run_dir, config):
                return run_dir
    return None


def finished(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir`` holds a run of ``config`` that completed all its rounds."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (summary.get("rounds_completed") == config.num_rounds
            and same_settings(run_dir, config))


def resumable(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir`` holds a stopped run of ``config`` that can continue: its
    orchestrator's and its nodes' checkpoints are there."""
    return ((run_dir / ROUTING_FILE).is_file() and (run_dir / NODE_STATE).is_dir()
            and same_settings(run_dir, config))


def same_settings(run_dir: Path, config: RunConfig) -> bool:
    """Whether the run in ``run_dir`` has ``config``'s settings (its config.json)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    # the run's and its algorithm's keys (what another algorithm reads cannot outdate a cell);
    # not how many threads ran it: two cells at once each take one (node_threads=1), a cell
    # alone torch's default, and the metrics differ only in float summation order
    comparable = {k: v for k, v in config.to_run_config().items()
                  if k not in (*PATH_KEYS, "run-name", "resume", "node-threads")}
    # a key newer than the saved run has the value its default stands for
    defaults = RunConfig(algorithm=config.algorithm).to_run_config()
    return all(saved.get(k, defaults[k]) == v for k, v in comparable.items())


def write_csv(sweep: Sweep, out: Path, cells: Sequence[Cell]) -> None:
    """metrics.csv: one line per round of every cell (empty where a metric does not apply)."""
    with open(out / "metrics.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("sweep", "method", sweep.key, "seed") + CSV_KEYS)
        for cell in cells:
            for row in cell_rows(out, sweep, cell):
                writer.writerow((sweep.name, cell.method, cell.value, cell.seed)
                                + tuple(row.get(k, "") for k in CSV_KEYS))


def mean_std_text(values: Sequence[float], decimals: int) -> str:
    """``values``' mean ± sample std as text, or the mean alone for one value (no spread)."""
    mean = f"{statistics.fmean(values):.{decimals}f}"
    return f"{mean} ± {statistics.stdev(values):.{decimals}f}" if len(values) > 1 else mean


def markdown_table(sweep: Sweep, summaries: Sequence[Mapping]) -> str:
    """Max Acc (%) and Conv. Rds per method (rows) and swept value (columns), mean ± std over
    seeds, and HyperPrism's improvement over the best other algorithm per column (rows of
    HyperPrism with other degrees, e.g. schedules, are ablations, not baselines).

    Conv. Rds is the first round whose mean node accuracy reaches the target; seeds that never
    reach it are counted as shown ("k/n reached"), and the mean is over the seeds that did.
    """
    by_cell: dict[tuple[str, object], list[Mapping]] = {}
    for summary in summaries:
        by_cell.setdefault((summary["method"], summary["value"]), []).append(summary)
    target = summaries[0]["target_accuracy"] if summaries else sweep.base.target_accuracy
    header = "| Method | " + " | ".join(f"{sweep.key} = {v}" for v in sweep.values) + " |"
    rule = "|---|" + "---|" * len(sweep.values)
    lines = [f"# {sweep.title}", "",
             f"Mean ± std over seeds {list(sweep.seeds)} (one value alone where one seed "
             f"stands for it). Max Acc: max over rounds of the mean "
             f"node accuracy (%). Conv. Rds: first round with mean node accuracy >= "
             f"{100 * target:g}%.", ""]
    expected = len(sweep.methods) * len(sweep.values) * len(sweep.seeds)
    if len(summaries) < expected:
        lines += [f"Partial: {len(summaries)} of {expected} cells have finished; — marks a "
                  f"method and value with none yet, and a gain whose column is incomplete.", ""]
    for metric, cell_text in (("Max Acc (%)", max_acc_text), ("Conv. Rds", rounds_text)):
        lines += [f"## {metric}", "", header, rule]
        for method in sweep.methods:
            groups = [by_cell.get((method, v), []) for v in sweep.values]
            cells = [seeds_shown(cell_text(g), len(g), len(sweep.seeds)) for g in groups]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    # the baselines: other algorithms (rows of HyperPrism with other degrees are ablations)
    baselines = [m for m in sweep.methods if sweep.algorithm(m) != "hyperprism"]
    if REFERENCE_METHOD in sweep.methods and baselines:
        lines += ["## HyperPrism against the best other method", "", header, rule]
        # only where every seed of HyperPrism and of every baseline is there: a partial column
        # would compare HyperPrism with whichever baselines happen to have finished
        gains = [improvement(by_cell, REFERENCE_METHOD, v, baselines)
                 if all(len(by_cell.get((m, v), [])) == len(sweep.seeds)
                        for m in (REFERENCE_METHOD, *baselines)) else ("—", "—")
                 for v in sweep.values]
        lines.append("| Max Acc (points) | " + " | ".join(g[0] for g in gains) + " |")
        lines.append("| Conv. Rds (fewer rounds) | " + " | ".join(g[1] for g in gains) + " |")
        lines.append("")
    seconds = {m: [s["seconds_total"] / max(s["rounds_completed"], 1)
                   for (method, _), group in by_cell.items() if method == m for s in group]
               for m in sweep.methods}
    lines += ["## Time per round (s, this machine)", "", "| Method | s / round |", "|---|---|"]
    lines += [f"| {m} | {statistics.fmean(v):.2f} |" for m, v in seconds.items() if v]
    return "\n".join(lines) + "\n"


def seeds_shown(text: str, finished_seeds: int, seeds: int) -> str:
    """``text`` marked with how many seeds it stands for when some have not finished."""
    if 0 < finished_seeds < seeds:
        return f"{text} [{finished_seeds} of {seeds} seeds]"
    return text


def max_acc_text(group: Sequence[Mapping]) -> str:
    if not group:
        return "—"
    return mean_std_text([100 * s["max_accuracy"] for s in group], decimals=2)


def rounds_text(group: Sequence[Mapping]) -> str:
    if not group:
        return "—"
    reached = [s["rounds_to_target"] for s in group if s["rounds_to_target"] is not None]
    if not reached:
        return f"not reached (0/{len(group)})"
    text = mean_std_text(reached, decimals=1)
    return text if len(reached) == len(group) else f"{text} ({len(reached)}/{len(group)} reached)"


def improvement(by_cell: Mapping, reference: str, value: object, others: Sequence[str]
                ) -> tuple[str, str]:
    """(accuracy gain in points, % fewer rounds to target) of ``reference`` over the best
    other method at ``value`` (best: highest mean Max Acc; fewest mean Conv. Rds)."""
    def mean_of(method: str, key: str) -> float | None:
        values = [s[key] for s in by_cell.get((method, value), []) if s[key] is not None]
        return statistics.fmean(values) if values else None

    ours_acc, ours_rounds = mean_of(reference, "max_accuracy"), mean_of(reference,
                                                                        "rounds_to_target")
    accs = [a for m in others if (a := mean_of(m, "max_accuracy")) is not None]
    rounds = [r for m in others if (r := mean_of(m, "rounds_to_target")) is not None]
    acc_text = f"{100 * (ours_acc - max(accs)):+.2f}" if ours_acc is not None and accs else "—"
    if ours_rounds is None or not rounds:
        rounds_text_ = "—"
    else:
        rounds_text_ = f"{100 * (min(rounds) - ours_rounds) / min(rounds):+.1f}%"
    return acc_text, rounds_text_


def results_dir(sweep: Sweep) -> Path:
    """Where a sweep's cells and report go unless told otherwise."""
    return Path(__file__).parent / "results" / sweep.name


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweep YAML file under simulations/")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every cell")
    parser.add_argument("--engine", choices=ENGINES, default="flower")
    parser.add_argument("--seeds", help="comma-separated seeds to run (default: the sweep "
                                        "file's); the table shows them and the file's")
    parser.add_argument("--method", action="append", default=[], dest="methods",
                        help="run only this row (repeat for more); the table shows every row")
    parser.add_argument("--value", action="append", default=[], dest="values",
                        help="run only this column of the swept key (repeat for more)")
    parser.add_argument("--out", type=Path, help="default: simulations/results/<sweep name>")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once, each in its own process (in-process engine)")
    parser.add_argument("--report", action="store_true",
                        help="run no cell: write metrics.csv, table.md and the plots from the "
                             "cells that have finished")
    args = parser.parse_args(argv)
    FLOWER_LOGGER.setLevel(logging.INFO)  # Flower's console handler prints the progress
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    sweep = Sweep.load(args.sweep, args.overrides).with_seeds(seeds or ())
    out = (args.out or results_dir(sweep)).resolve()
    if args.report:
        if not (out / "cells").is_dir():
            parser.error(f"--report: no cells under {out}; run the sweep first, or pass the "
                         f"--out it wrote to")
        report(sweep, out)
    else:
        try:
            cells = sweep.selected(args.methods, args.values, seeds or ())
        except ValueError as err:
            parser.error(str(err))
        run_sweep(sweep, out, args.engine, args.jobs, cells)
    print(out / "table.md")


if __name__ == "__main__":
    main()
