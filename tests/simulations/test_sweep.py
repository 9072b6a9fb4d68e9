"""The sweep runner: a tiny sweep end to end, resume, the table's metric definitions."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from flwr_hyperprism.setup.settings import settings_type
from simulations.sweep import finished, main, markdown_table, reusable_cell, run_sweep
from simulations.sweep_file import Sweep
from strategies.base.group import NodeGroup

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"

TINY = """
name: tiny
title: Tiny sweep
configs: [base.yaml]
methods:
  HyperPrism: {algorithm: hyperprism}
  D-PSGD: {algorithm: dpsgd}
sweep:
  alpha: [0.1, 10.0]
seeds: [0, 1]
"""
# node after node: the Flower engine's cells must equal the in-process ones exactly
TINY_SETTINGS = ["num_nodes=4", "num_rounds=2", "local_steps=3", "eval_size=300",
                 "target_accuracy=0.3", "node_batching=false"]


@pytest.fixture
def tiny_sweep(tmp_path) -> Sweep:
    (tmp_path / "base.yaml").write_text((SIMULATIONS / "base.yaml").read_text())
    (tmp_path / "tiny.yaml").write_text(TINY)
    return Sweep.load(tmp_path / "tiny.yaml", TINY_SETTINGS)


def test_a_tiny_sweep_runs_every_cell_and_writes_csv_table_and_plots(tmp_path, tiny_sweep,
                                                                      caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="flwr"):
        summaries = run_sweep(tiny_sweep, out)
    assert len(summaries) == 8 and {s["num_nodes"] for s in summaries} == {4}
    assert {(s["method"], s["value"], s["seed"]) for s in summaries} == {
        (m, v, s) for m in ("HyperPrism", "D-PSGD") for v in (0.1, 10.0) for s in (0, 1)}
    assert any("cell 8 of 8" in r.getMessage() and "ETA" in r.getMessage()
               for r in caplog.records)
    # run seed by seed and column by column: a stopped sweep leaves whole columns
    done = sorted((out / "cells").iterdir(),
                  key=lambda c: (c / "summary.json").stat().st_mtime_ns)
    assert [c.name for c in done[:4]] == [
        "HyperPrism__alpha=0.1__seed0", "D-PSGD__alpha=0.1__seed0",
        "HyperPrism__alpha=10.0__seed0", "D-PSGD__alpha=10.0__seed0"]
    with open(out / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 * 3  # rounds 0..2 of every cell
    assert rows[0].keys() >= {"method", "alpha", "seed", "round", "accuracy_mean", "p_theta_std"}
    assert {r["p_theta_mean"] for r in rows if r["method"] == "D-PSGD"} == {""}
    table = (out / "table.md").read_text()
    assert "| Method | alpha = 0.1 | alpha = 10.0 |" in table
    assert "## HyperPrism against the best other method" in table
    for name in ("curves.png", "p_degrees.png", "p_nodes.png"):
        assert (out / name).stat().st_size > 10_000


def test_an_interrupted_sweep_resumes_with_the_unfinished_cells_only(tmp_path, tiny_sweep,
                                                                      caplog):
    out = tmp_path / "out"
    run_sweep(tiny_sweep, out)
    table = (out / "table.md").read_text().split("## Time per round")[0]
    cells = sorted((out / "cells").iterdir())
    (cells[3] / "summary.json").unlink()  # as if stopped during that cell
    stamps = {c.name: (c / "metrics.jsonl").stat().st_mtime_ns for c in cells}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_sweep(tiny_sweep, out)
    messages = [r.getMessage() for r in caplog.records if "[sweep tiny]" in r.getMessage()]
    assert sum("already done" in m for m in messages) == 7
    assert [c.name for c in cells if (c / "metrics.jsonl").stat().st_mtime_ns != stamps[c.name]
            ] == [cells[3].name]
    assert (out / "table.md").read_text().split("## Time per round")[0] == table
    # a changed setting is a different run: not "finished"; a moved data directory or another
    # thread count is not
    cell = tiny_sweep.cells()[0]
    assert finished(out / "cells" / cell.id("alpha"), cell.config)
    assert finished(out / "cells" / cell.id("alpha"), cell.config.replace(data_dir="/elsewhere"))
    assert finished(out / "cells" / cell.id("alpha"), cell.config.replace(node_threads=1))
    assert not finished(out / "cells" / cell.id("alpha"), cell.config.replace(lr=0.5))
    saved = json.loads((out / "cells" / cell.id("alpha") / "config.json").read_text())
    assert saved["output-dir"] == "cells"  # relative to the sweep's output directory


def test_a_sweep_copies_the_cells_a_reused_sweep_finished_with_the_same_settings(
        tmp_path, tiny_sweep, caplog):
    results = tmp_path / "results"
    run_sweep(tiny_sweep, results / "tiny")
    # a second table whose alpha = 10.0 column, seed 0, is the tiny sweep's; 1.0 is new
    (tmp_path / "other.yaml").write_text(TINY.replace("name: tiny", "name: other")
                                         .replace("[0.1, 10.0]", "[10.0, 1.0]")
                                         .replace("seeds: [0, 1]", "seeds: [0]")
                                         + "reuses: [tiny.yaml]\n")
    other = Sweep.load(tmp_path / "other.yaml", TINY_SETTINGS)
    assert other.reuses == ("tiny",)
    with caplog.at_level(logging.INFO, logger="flwr"):
        summaries = run_sweep(other, results / "other")
    copied = sorted(r.getMessage().split("(")[1].split(")")[0] for r in caplog.records
                    if "copied from" in r.getMessage())
    assert copied == ["D-PSGD__alpha=10.0__seed0", "HyperPrism__alpha=10.0__seed0"]
    assert len(summaries) == 4
    for name in copied:
        for file in ("metrics.jsonl", "summary.json"):
            assert ((results / "other" / "cells" / name / file).read_bytes()
                    == (results / "tiny" / "cells" / name / file).read_bytes())
    # another setting is another run: nothing to copy
    changed = Sweep.load(tmp_path / "other.yaml", [*TINY_SETTINGS, "lr=0.02"])
    assert reusable_cell(changed, results / "other", changed.cells()[0].config) is None
    (tmp_path / "bad.yaml").write_text("methods: {A: {}}\nsweep: {alpha: [1.0]}\n"
                                       "reuses: [missing.yaml]\n")
    with pytest.raises(ValueError, match="reuses: no sweep file .*missing.yaml"):
        Sweep.load(tmp_path / "bad.yaml")


def test_a_cell_stopped_part_way_continues_from_its_checkpoints_with_the_same_metrics(
        tmp_path, tiny_sweep, monkeypatch, caplog):
    # batched, HyperPrism and D-PSGD, one seed, a round more than the tiny sweep
    sweep = Sweep.load(tmp_path / "tiny.yaml", [*TINY_SETTINGS, "num_rounds=3",
                                                "node_batching=true"], seeds=[0])
    run_sweep(sweep, tmp_path / "clean")

    class Stopped(Exception):
        pass

    step = NodeGroup.step

    def stop_at_round_2(group, states, tasks, routed):
        if any(task.round == 2 for task in tasks.values()):
            raise Stopped
        return step(group, states, tasks, routed)

    monkeypatch.setattr(NodeGroup, "step", stop_at_round_2)
    with pytest.raises(Stopped):
        run_sweep(sweep, tmp_path / "again")
    monkeypatch.undo()
    stopped = tmp_path / "again" / "cells" / sweep.cells()[0].id("alpha")
    assert (stopped / "node-state").is_dir() and not finished(stopped, sweep.cells()[0].config)
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_sweep(sweep, tmp_path / "again")
    assert any("was stopped: continuing it" in r.getMessage() for r in caplog.records)
    for cell in sweep.cells():
        rows = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for out in ("clean", "again")
                for line in (tmp_path / out / "cells" / cell.id("alpha") / "metrics.jsonl"
                             ).read_text().splitlines()]
        assert rows[:4] == rows[4:] and len(rows) == 8  # rounds 0..3, as uninterrupted
        assert not (tmp_path / "again" / "cells" / cell.id("alpha") / "node-state").exists()


def test_a_report_shows_the_finished_cells_and_runs_none(tmp_path, tiny_sweep):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    run_sweep(tiny_sweep, out)
    full = (out / "table.md").read_text()
    for cell in tiny_sweep.cells():
        if cell.method == "D-PSGD" and cell.value == 10.0:  # as if not run yet: no summary
            (out / "cells" / cell.id("alpha") / "summary.json").unlink()
    for name in ("metrics.csv", "table.md", "curves.png", "p_degrees.png", "p_nodes.png"):
        (out / name).unlink()
    stamps = {c.name: (c / "metrics.jsonl").stat().st_mtime_ns for c in (out / "cells").iterdir()}
    main([str(tmp_path / "tiny.yaml"), *TINY_SETTINGS, "--out", str(out), "--report"])
    assert {c.name: (c / "metrics.jsonl").stat().st_mtime_ns
            for c in (out / "cells").iterdir()} == stamps  # nothing ran
    table = (out / "table.md").read_text()
    assert "Partial: 6 of 8 cells have finished" in table and "Partial" not in full
    d_psgd = next(line for line in table.splitlines() if line.startswith("| D-PSGD |"))
    assert d_psgd.endswith("| — |")
    hyperprism = [line for line in table.splitlines() if line.startswith("| HyperPrism |")]
    assert hyperprism == [line for line in full.splitlines() if line.startswith("| HyperPrism |")]
    gain = next(line for line in table.splitlines() if line.startswith("| Max Acc (points) |"))
    assert gain.endswith("| — |") and "| — |" not in gain[:-5]  # only the complete column
    with open(out / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 * 3 and ("D-PSGD", "10.0") not in {(r["method"], r["alpha"])
                                                              for r in rows}
    for name in ("curves.png", "p_degrees.png", "p_nodes.png"):
        assert (out / name).stat().st_size > 10_000
    with pytest.raises(SystemExit):  # a mistyped --out: no cells there
        main([str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "elsewhere"), "--report"])
    assert not (tmp_path / "elsewhere").exists()


def summary(method: str, value: float, max_accuracy: float, rounds: int | None) -> dict:
    return {"method": method, "value": value, "max_accuracy": max_accuracy,
            "rounds_to_target": rounds, "target_accuracy": 0.85, "seconds_total": 10.0,
            "rounds_completed": 100}


def test_table_metrics_mean_std_reached_counts_and_improvements(tiny_sweep):
    summaries = [
        summary("HyperPrism", 0.1, 0.90, 10), summary("HyperPrism", 0.1, 0.92, 14),
        summary("D-PSGD", 0.1, 0.88, 20), summary("D-PSGD", 0.1, 0.86, None),
        summary("HyperPrism", 10.0, 0.80, None), summary("HyperPrism", 10.0, 0.81, None),
        summary("D-PSGD", 10.0, 0.84, None), summary("D-PSGD", 10.0, 0.85, 90),
    ]
    table = markdown_table(tiny_sweep, summaries)
    assert "| HyperPrism | 91.00 ± 1.41 | 80.50 ± 0.71 |" in table  # sample std
    assert "| HyperPrism | 12.0 ± 2.8 | not reached (0/2) |" in table
    assert "| D-PSGD | 20.0 (1/2 reached) | 90.0 (1/2 reached) |" in table
    # +4 points over D-PSGD's 87%; 12 rounds against 20: 40% fewer
    assert "| Max Acc (points) | +4.00 | -4.00 |" in table
    assert "| Conv. Rds (fewer rounds) | +40.0% | — |" in table
    assert "first round with mean node accuracy >= 85%" in table
    partial = markdown_table(tiny_sweep, summaries[1:])  # HyperPrism's first seed is missing
    assert "| HyperPrism | 92.00 [1 of 2 seeds] | 80.50 ± 0.71 |" in partial
    assert "| HyperPrism | 14.0 [1 of 2 seeds] | not reached (0/2) |" in partial
    assert "| HyperPrism | 0.10 |" in table  # 10 s over 100 rounds


@pytest.mark.parametrize(("text", "message"), [
    ("methods: {A: {}}\nsweep: {alpha: [1.0]}\nbogus: 1\n", "unknown keys \\['bogus'\\]"),
    ("methods: {A: {}}\nsweep: {alpha: [1.0], density: [0.5]}\n", "exactly one config key"),
    ("methods: {A: {}}\nsweep: {alpha: [0.0]}\n", "'alpha' must be > 0, got 0.0"),
    ("methods: {A: {algorithm: fedavg}}\nsweep: {alpha: [1.0]}\n", "'fedavg' is not one of"),
    ("methods: {A: {}}\nsweep: {alpha: [1.0]}\nreuses: table2_alpha.yaml\n",
     "'reuses' must be a list"),
])
def test_bad_sweep_files_fail_before_any_run(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        Sweep.load(tmp_path / "bad.yaml")


# The rows of the paper's tables (HyperPrism and its baselines) plus ``local``; an algorithm
# added later is not a row unless a sweep file makes it one.
PAPER_ALGORITHMS = {"hyperprism", "dpsgd", "swarmsgd", "mudag", "adom", "local"}


@pytest.mark.parametrize(("name", "key", "values"), [
    ("table2_alpha", "alpha", (0.1, 1.0, 10.0)),
    ("table3_density", "density", (0.2, 0.5, 0.8)),
    ("table4_nodes", "num_nodes", (20, 50, 100)),
    ("fig2_p_sweep", "fixed_p", (1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0)),
])
def test_the_shipped_sweeps_are_the_papers(name, key, values):
    sweep = Sweep.load(SIMULATIONS / f"{name}.yaml")
    assert (sweep.key, sweep.values, sweep.seeds) == (key, values, (0, 1, 2))
    base = sweep.base
    assert (base.dataset, base.model, base.num_rounds, base.lr, base.batch_size) == (
        "mnist", "logreg", 100, 0.01, 128)
    if name != "table4_nodes":
        assert base.num_nodes == 50
    cells = sweep.cells()
    assert len(cells) == len(sweep.methods) * len(values) * 3
    if name != "fig2_p_sweep":  # the paper's methods and the no-communication lower bound
        assert {c.config.algorithm for c in cells} == PAPER_ALGORITHMS


def test_the_cnn_sweeps_run_lenet_on_fashion_mnist_and_share_their_seed_0_cells():
    table = Sweep.load(SIMULATIONS / "table2_alpha_cnn.yaml")
    seeds = Sweep.load(SIMULATIONS / "table2_alpha_cnn_seeds.yaml")
    for sweep in (table, seeds):
        base = sweep.base
        assert (base.dataset, base.model, base.num_nodes, base.num_rounds, base.lr,
                base.batch_size, base.target_accuracy) == ("fashion-mnist", "lenet", 50, 100,
                                                          0.01, 128, 0.70)
    assert {c.config.algorithm for c in table.cells()} == PAPER_ALGORITHMS
    assert seeds.seeds == (0, 1, 2)
    by_id = {c.id(table.key): c.config for c in table.cells()}
    shared = [c for c in seeds.cells() if c.seed == 0]
    assert shared and all(by_id[c.id(seeds.key)] == c.config for c in shared)


# the validation searches' grid of SGD steps: lr, or 1 / L (L = 3 gives 0.33)
STEP_GRID = {0.01, 0.03, 0.1, 0.3, 1.0, 1 / 3}


def test_the_tuned_cnn_tables_share_methods_settings_and_their_base_column():
    tuned = Sweep.load(SIMULATIONS / "table2_alpha_cnn_tuned.yaml")
    density = Sweep.load(SIMULATIONS / "table3_density_cnn.yaml")
    nodes = Sweep.load(SIMULATIONS / "table4_nodes_cnn.yaml")
    assert tuned.methods == density.methods == nodes.methods
    assert (tuned.values, density.values, nodes.values) == ((0.1, 1.0, 10.0), (0.2, 0.5, 0.8),
                                                            (20, 50, 100))
    assert tuned.seeds == (0, 1, 2)
    base = tuned.base
    assert (base.dataset, base.model, base.num_nodes, base.density, base.num_rounds,
            base.batch_size, base.target_accuracy) == ("fashion-mnist", "lenet", 50, 0.5, 100,
                                                       128, 0.70)
    cells = tuned.cells()
    assert {c.config.algorithm for c in cells} == PAPER_ALGORITHMS
    for cell in cells:  # every method's step was chosen from the grid
        algorithm = cell.config.algorithm
        step = (1 / settings_type(algorithm).of(cell.config).smoothness  # type: ignore[attr-defined]
                if algorithm in ("mudag", "adom") else cell.config.lr)
        assert step in STEP_GRID, cell.method
    # Table 3's density 0.5 and Table 4's 50 nodes are Table 2's alpha = 0.1, seed 0: same runs
    by_method = {c.method: c.config for c in cells if c.value == 0.1 and c.seed == 0}
    for sweep, value in ((density, 0.5), (nodes, 50)):
        column = {c.method: c.config for c in sweep.cells() if c.value == value}
        assert column == by_method
        assert sweep.reuses == ("table2_alpha_cnn_tuned",)  # so those cells are copied


def test_the_command_line_takes_overrides_and_runs_the_seeds_given_reporting_the_files_too(
        tmp_path, tiny_sweep, capsys):
    main([str(tmp_path / "tiny.yaml"), *TINY_SETTINGS, "--engine", "inprocess",
          "--seeds", "5", "--out", str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "table.md")
    cells = list((tmp_path / "cli" / "cells").iterdir())
    assert len(cells) == 4 and all(c.name.endswith("seed5") for c in cells)
    table = (tmp_path / "cli" / "table.md").read_text()  # the file's seeds stay in the table
    assert "seeds [0, 1, 5]" in table and "4 of 12 cells have finished" in table
    with pytest.raises(ValueError, match=r"seeds \[7\] are not seeds of sweep tiny: \[0, 1\]"):
        tiny_sweep.selected(seeds=[7])


def test_the_command_line_runs_chosen_rows_and_columns_and_reports_the_whole_table(
        tmp_path, tiny_sweep, capsys):
    out = tmp_path / "some"
    main([str(tmp_path / "tiny.yaml"), *TINY_SETTINGS, "--engine", "inprocess", "--seeds", "0",
          "--method", "D-PSGD", "--value", "10.0", "--out", str(out)])
    assert [c.name for c in (out / "cells").iterdir()] == ["D-PSGD__alpha=10.0__seed0"]
    table = (out / "table.md").read_text()
    assert "HyperPrism" in table and "D-PSGD" in table and "—" in table
    for wrong, named in ((["--method", "DPSGD"], "'DPSGD'"), (["--value", "10"], "'10'")):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "tiny.yaml"), *TINY_SETTINGS, *wrong, "--out", str(out)])
        assert named in capsys.readouterr().err


@pytest.mark.slow
def test_the_flower_engine_gives_the_in_process_metrics(tmp_path, tiny_sweep):
    (tmp_path / "one.yaml").write_text(TINY.replace("  D-PSGD: {algorithm: dpsgd}\n", "")
                                       .replace("alpha: [0.1, 10.0]", "alpha: [0.1]"))
    sweep = Sweep.load(tmp_path / "one.yaml", TINY_SETTINGS + ["node_wait_timeout=120"],
                       seeds=[0])  # one cell: each Ray start costs about 10 s
    run_sweep(sweep, tmp_path / "flower", "flower")
    run_sweep(sweep, tmp_path / "inprocess", "inprocess")

    def rows(out: Path) -> list[dict]:
        with open(out / "metrics.csv") as file:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(file)]

    assert rows(tmp_path / "flower") == rows(tmp_path / "inprocess")


def test_every_method_whose_nodes_choose_their_degrees_gets_a_per_node_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from simulations.plots import per_node_degree_methods

    (tmp_path / "base.yaml").write_text((SIMULATIONS / "base.yaml").read_text())
    (tmp_path / "mixed.yaml").write_text(TINY.replace("name: tiny", "name: mixed").replace(
        "  D-PSGD: {algorithm: dpsgd}\n",
        "  D-PSGD: {algorithm: dpsgd}\n  learned: {algorithm: hyperprism, p_mode: tracking}\n"
        "  fixed: {algorithm: hyperprism, p_mode: fixed, fixed_p: 3.0}\n"
        "  learned, slow: {algorithm: hyperprism, p_mode: tracking, p_step: 0.5}\n"))
    sweep = Sweep.load(tmp_path / "mixed.yaml", TINY_SETTINGS)
    assert per_node_degree_methods(sweep) == {"HyperPrism": "p_nodes.png",
                                              "learned": "p_nodes_tracking.png",
                                              "learned, slow": "p_nodes_learned__slow.png"}


def test_parallel_cells_give_the_sequential_metrics(tmp_path, tiny_sweep):
    run_sweep(tiny_sweep, tmp_path / "one", jobs=1)
    run_sweep(tiny_sweep, tmp_path / "two", jobs=2)

    def rows(out: Path) -> list[dict]:
        with open(out / "metrics.csv") as file:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(file)]

    assert rows(tmp_path / "one") == rows(tmp_path / "two")
    with pytest.raises(ValueError, match="> 1 only with --engine inprocess"):
        run_sweep(tiny_sweep, tmp_path / "ray", "flower", jobs=2)


def test_an_override_reaches_the_rows_of_the_algorithms_that_have_it():
    sweep = Sweep.load(SIMULATIONS / "table2_alpha.yaml", ["smoothness=50", "num_rounds=7"])
    by_algorithm = {c.config.algorithm: c.config for c in sweep.cells()}
    for algorithm in ("mudag", "adom"):
        assert by_algorithm[algorithm].algorithm_settings.to_run_config()["smoothness"] == 50.0
    assert {c.num_rounds for c in by_algorithm.values()} == {7}
    with pytest.warns(UserWarning, match="settings swarm_unmatched belong to no algorithm"):
        Sweep.load(SIMULATIONS / "fig2_p_sweep.yaml", ["swarm-unmatched=idle"])


@pytest.mark.parametrize(("seeds_file", "table_file", "base_value"), [
    ("table3_density_cnn_seeds", "table3_density_cnn", 0.5),
    ("table4_nodes_cnn_seeds", "table4_nodes_cnn", 50),
])
def test_the_cnn_seed_sweeps_rerun_only_the_cells_their_tables_lack(seeds_file, table_file,
                                                                    base_value):
    """Three seeds of a CNN table's rows: its seed-0 cells are the table's runs, and its base
    column's are Table 2's alpha = 0.1 runs (same config), so only the others are new."""
    seeds = Sweep.load(SIMULATIONS / f"{seeds_file}.yaml")
    table = Sweep.load(SIMULATIONS / f"{table_file}.yaml")
    table2 = Sweep.load(SIMULATIONS / "table2_alpha_cnn_tuned.yaml")
    assert seeds.seeds == (0, 1, 2) and (seeds.key, seeds.values) == (table.key, table.values)
    assert set(seeds.methods) < set(table.methods)
    assert seeds.reuses == (table.name, table2.name)
    in_table = {c.id(table.key): c.config for c in table.cells()}
    in_table2 = {(c.method, c.seed): c.config for c in table2.cells() if c.value == 0.1}
    for cell in seeds.cells():
        if cell.seed == 0:
            assert cell.config == in_table[cell.id(seeds.key)]
        if cell.value == base_value:
            assert cell.config == in_table2[(cell.method, cell.seed)]
