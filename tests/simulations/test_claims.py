"""The claims table: its measures on known numbers, and end to end on a tiny sweep's cells."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from simulations.claims import Run, Setting, claim_texts, load_claims_file, main
from simulations.sweep import run_sweep
from simulations.sweep_file import Sweep

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"
BASELINES = ["D-PSGD", "Mudag"]


def setting(label: str, accuracy: dict[str, float], rounds: dict[str, float],
            degrees: list[tuple[float, float]] | None = None) -> Setting:
    """One seed (0) of each method in ``accuracy``; HyperPrism's degrees ``degrees``."""
    return Setting(label, {m: {0: Run(a, a, cast(int | None, rounds.get(m)),
                                      (degrees or [(1.0, 1.0)]) if m == "HyperPrism" else [])}
                           for m, a in accuracy.items()})


def test_the_claims_compare_the_variant_with_the_baselines_only():
    settings = [
        # Local (not a baseline) is more accurate and faster here: it is not counted
        setting("alpha = 0.1", {"HyperPrism": 0.80, "D-PSGD": 0.78, "Mudag": 0.60, "Local": 0.9},
                {"HyperPrism": 5.0, "D-PSGD": 20.0, "Mudag": 50.0, "Local": 1.0},
                [(9.0, 1.0), (3.0, 1.0)]),
        setting("alpha = 1.0", {"HyperPrism": 0.85, "D-PSGD": 0.86, "Mudag": 0.70},
                {"HyperPrism": 12.0, "Mudag": 10.0}, [(1.0, 1.0), (1.0, 2.0)]),
        setting("alpha = 10.0", {"HyperPrism": 0.50, "D-PSGD": 0.40, "Mudag": 0.45}, {}),
    ]
    texts = claim_texts(settings, "HyperPrism", BASELINES)
    assert texts["fastest"] == "1 of 2 (fastest elsewhere: alpha = 1.0: Mudag)"
    assert texts["best accuracy"] == "2 of 3; against the best baseline -1.00 to +5.00 points"
    # 20 -> 5 rounds against D-PSGD (the fastest baseline), 50 -> 5 against Mudag (slowest)
    assert texts["fewer rounds"] == (
        "+75.0% against the fastest baseline reaching the target (alpha = 0.1, D-PSGD: "
        "20.0 → 5.0 rounds); +90.0% against the slowest baseline reaching the target "
        "(alpha = 0.1, Mudag: 50.0 → 5.0 rounds)")
    assert texts["more accuracy"] == ("+5.00 points over the best baseline (alpha = 10.0); "
                                      "+20.00 over any (alpha = 0.1, Mudag)")
    # per setting: theta (9 + 3) / 2 = 6 and 1; phi 1 and 1.5; the gap 8 is at round 1
    assert texts["p_theta against p_phi"] == (
        "mean over rounds p_θ 1.00 to 6.00, p_φ 1.00 to 1.50; largest gap 8.00 (alpha = 0.1, "
        "round 1)")


def test_one_baseline_reaching_the_target_is_named_once_and_none_gives_a_dash():
    reached = [setting("density = 0.5", {"HyperPrism": 0.8, "D-PSGD": 0.7, "Mudag": 0.1},
                       {"HyperPrism": 8.0, "D-PSGD": 10.0})]
    assert claim_texts(reached, "HyperPrism", BASELINES)["fewer rounds"] == (
        "+20.0% against the only baseline reaching the target (density = 0.5, D-PSGD: "
        "10.0 → 8.0 rounds)")
    not_reached = [setting("density = 0.5", {"HyperPrism": 0.8, "D-PSGD": 0.7, "Mudag": 0.6},
                           {})]
    texts = claim_texts(not_reached, "HyperPrism", BASELINES)
    assert (texts["fastest"], texts["fewer rounds"]) == ("0 of 0", "—")


def test_a_setting_where_a_baseline_has_not_finished_is_not_compared():
    finished = setting("alpha = 0.1", {"HyperPrism": 0.8, "D-PSGD": 0.7, "Mudag": 0.6}, {})
    # Mudag has not finished at alpha = 1.0: HyperPrism would look best against D-PSGD alone
    partial = setting("alpha = 1.0", {"HyperPrism": 0.8, "D-PSGD": 0.7}, {})
    texts = claim_texts([finished, partial], "HyperPrism", BASELINES)
    assert texts["compared"] == "1; seeds each: 1"
    assert texts["best accuracy"] == "1 of 1; against the best baseline +10.00 points"


def runs(by_seed: dict[int, tuple[float, int | None]], final: float | None = None
         ) -> dict[int, Run]:
    """Runs of (Max Acc, Conv. Rds) by seed; their last-round accuracy ``final`` (default:
    their Max Acc)."""
    return {seed: Run(accuracy, accuracy if final is None else final, rounds, [])
            for seed, (accuracy, rounds) in by_seed.items()}


def test_a_setting_is_compared_over_the_seeds_every_method_finished():
    # seed 1 is the only one all three finished: the others' seeds 0 and 2 are left out
    three_and_one = Setting("alpha = 1.0", {
        "HyperPrism": runs({0: (0.9, 5), 1: (0.8, 10), 2: (0.9, 5)}),
        "D-PSGD": runs({0: (0.5, None), 1: (0.7, 20), 2: (0.5, None)}),
        "Mudag": runs({1: (0.6, None)})})
    # as many seeds each, but different ones: nothing to compare
    disjoint = Setting("alpha = 10.0", {"HyperPrism": runs({0: (0.9, 5)}),
                                        "D-PSGD": runs({0: (0.5, 9)}),
                                        "Mudag": runs({1: (0.6, 7)})})
    texts = claim_texts([three_and_one, disjoint], "HyperPrism", BASELINES)
    assert texts["compared"] == "1; seeds each: 1"
    assert texts["best accuracy"] == "1 of 1; against the best baseline +10.00 points"
    assert texts["fewer rounds"] == (
        "+50.0% against the only baseline reaching the target (alpha = 1.0, D-PSGD: "
        "20.0 → 10.0 rounds)")
    # a method reaching the target in some of the shared seeds only has no Conv. Rds there
    some = Setting("alpha = 0.1", {"HyperPrism": runs({0: (0.9, 5), 1: (0.8, None)}),
                                   "D-PSGD": runs({0: (0.5, 30), 1: (0.7, 20)}),
                                   "Mudag": runs({0: (0.6, None), 1: (0.6, None)})})
    texts = claim_texts([some], "HyperPrism", BASELINES)
    assert texts["compared"] == "1; seeds each: 2"
    assert texts["fastest"] == "0 of 1 (fastest elsewhere: alpha = 0.1: D-PSGD)"
    assert texts["best accuracy"] == "1 of 1; against the best baseline +25.00 points"


def test_a_run_that_collapses_after_its_peak_keeps_its_max_acc_but_not_its_final_accuracy():
    collapsed = Setting("alpha = 0.1", {"HyperPrism": runs({0: (0.80, 20)}, final=0.09),
                                        "D-PSGD": runs({0: (0.78, 20)}, final=0.78),
                                        "Mudag": runs({0: (0.60, None)}, final=0.55)})
    texts = claim_texts([collapsed], "HyperPrism", BASELINES)
    assert texts["best accuracy"] == "1 of 1; against the best baseline +2.00 points"
    assert texts["final accuracy"] == "0 of 1; against the best baseline -69.00 points"


TINY = """
name: tiny_claims
title: Tiny claims
configs: [base.yaml, tiny_settings.yaml]
methods:
  HyperPrism: {algorithm: hyperprism}
  D-PSGD: {algorithm: dpsgd}
  Local: {algorithm: local}
sweep:
  alpha: [0.1, 10.0]
seeds: [0]
"""


def test_the_command_reads_the_finished_cells_of_each_workload(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text((SIMULATIONS / "base.yaml").read_text())
    (tmp_path / "tiny_settings.yaml").write_text(
        "{num_nodes: 4, num_rounds: 2, local_steps: 3, eval_size: 300, target_accuracy: 0.3}")
    (tmp_path / "tiny.yaml").write_text(TINY)
    sweep = Sweep.load(tmp_path / "tiny.yaml")
    (tmp_path / "claims.yaml").write_text('workloads: {"Tiny LR": [tiny.yaml]}\n')
    summaries = run_sweep(sweep, tmp_path / "results" / "tiny_claims", jobs=1)
    main([str(tmp_path / "claims.yaml"), "--results", str(tmp_path / "results"),
          "--out", str(tmp_path / "claims.md")])
    table = capsys.readouterr().out
    assert table == (tmp_path / "claims.md").read_text()
    assert "| claim | HyperPrism | Tiny LR |" in table
    assert "| (finished) | | 6 of 6 cells, 2 settings |" in table
    by_cell = {(s["method"], s["value"]): s["max_accuracy"] for s in summaries}
    gaps = [100 * (by_cell["HyperPrism", v] - by_cell["D-PSGD", v]) for v in (0.1, 10.0)]
    assert f"against the best baseline {min(gaps):+.2f} to {max(gaps):+.2f} points" in table


def test_a_claims_file_names_its_workloads(tmp_path):
    (tmp_path / "claims.yaml").write_text("table2: [table2_alpha.yaml]\n")
    with pytest.raises(ValueError, match="give exactly 'workloads'"):
        load_claims_file(tmp_path / "claims.yaml")
    shipped = load_claims_file(SIMULATIONS / "claims.yaml")
    assert [s.name for s in shipped["LR on MNIST"]] == ["table2_alpha", "table3_density",
                                                        "table4_nodes"]
