"""The paper's claims, measured on our sweeps: one column per workload.

    python -m simulations.claims simulations/claims.yaml [--results DIR] [--out FILE]

A claims file names the workloads and, for each, the sweep files of its tables (e.g. Tables 2,
3 and 4). Their finished cells, where ``simulations.sweep`` wrote them
(``simulations/results/<sweep name>``), are read; nothing is run. A *setting* is one value of
one sweep (Table 2's alpha = 0.1 is one). HyperPrism's variants are the methods whose algorithm
is ``hyperprism``; the *baselines* are the other methods but ``local`` (no communication: the
lower bound, not a baseline of the paper). Each variant is compared with the baselines only:
the other variants are ablations of it, not competitors.

Per setting, a variant is compared with the baselines over the seeds that it and every
baseline have finished (none: not compared there). A method's Max Acc is its mean over those
seeds, and its Conv. Rds the mean over them of the first round at the target accuracy, counted
only when every one of them reaches it (a method that reaches it in some seeds has no Conv. Rds
there). A setting that several tables share (the base setting: Table 2's alpha = 0.1, Table 3's
density = 0.5, Table 4's 50 nodes) counts once per table, as the paper's tables count it.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from .sweep import finished_summaries, results_dir
from .sweep_file import Sweep, cell_rows

NOT_A_BASELINE = {"hyperprism", "local"}


@dataclass(frozen=True)
class Run:
    """One finished cell's measures."""

    max_accuracy: float  # fraction
    final_accuracy: float  # fraction, at the last round (a run that collapsed keeps its Max Acc)
    rounds_to_target: int | None  # first round at the target accuracy; None if never
    degrees: Sequence[tuple[float, float]]  # per round from round 1: (p_theta, p_phi), means
    # over nodes; empty for a method without degrees


@dataclass(frozen=True)
class Means:
    """Every compared method's results at one setting, means over the seeds they all
    finished."""

    label: str  # e.g. "alpha = 0.1"
    seeds: Sequence[int]  # the seeds every compared method finished there
    max_accuracy: Mapping[str, float]  # method -> mean Max Acc (fraction)
    final_accuracy: Mapping[str, float]  # method -> mean last-round accuracy (fraction)
    rounds: Mapping[str, float]  # method -> mean Conv. Rds, if every seed reached the target
    degrees: Mapping[str, Sequence[tuple[float, float]]]  # method -> per round from round 1:
    # (p_theta, p_phi), means over nodes and seeds


@dataclass(frozen=True)
class Setting:
    """One swept value of one sweep, with every method's finished runs there."""

    label: str  # e.g. "alpha = 0.1"
    runs: Mapping[str, Mapping[int, Run]]  # method -> seed -> run

    def means(self, methods: Sequence[str]) -> Means | None:
        """The results of ``methods`` over the seeds all of them finished here; None where
        they share none (one of them has not finished, or each finished other seeds)."""
        seeds = sorted(set.intersection(*(set(self.runs.get(m, ())) for m in methods)))
        if not seeds:
            return None
        runs = {m: [self.runs[m][seed] for seed in seeds] for m in methods}
        return Means(
            self.label, seeds,
            {m: statistics.fmean(r.max_accuracy for r in rs) for m, rs in runs.items()},
            {m: statistics.fmean(r.final_accuracy for r in rs) for m, rs in runs.items()},
            {m: statistics.fmean(cast(int, r.rounds_to_target) for r in rs)
             for m, rs in runs.items() if all(r.rounds_to_target is not None for r in rs)},
            {m: seed_means([r.degrees for r in rs]) for m, rs in runs.items()
             if all(r.degrees for r in rs)})


def load_settings(sweep: Sweep, out: Path) -> list[Setting]:
    """Every value of ``sweep`` at which at least one cell in ``out`` has finished."""
    done = finished_summaries(sweep, out)
    settings = []
    for value in sweep.values:
        runs: dict[str, dict[int, Run]] = {}
        for cell, summary in done:
            if cell.value == value:
                rows = cell_rows(out, sweep, cell)
                degrees = [(row["p_theta_mean"], row["p_phi_mean"])
                           for row in rows[1:] if "p_theta_mean" in row]
                runs.setdefault(cell.method, {})[cell.seed] = Run(
                    summary["max_accuracy"], rows[-1]["accuracy_mean"],
                    summary["rounds_to_target"], degrees)
        if runs:
            settings.append(Setting(f"{sweep.key} = {value}", runs))
    return settings


def seed_means(runs: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Per round, (p_theta, p_phi) averaged over the seeds' ``runs`` (the rounds all have)."""
    return [(statistics.fmean(run[i][0] for run in runs),
             statistics.fmean(run[i][1] for run in runs))
            for i in range(min(len(run) for run in runs))]


def claim_texts(settings: Sequence[Setting], variant: str, baselines: Sequence[str]
                ) -> dict[str, str]:
    """The claims for HyperPrism variant ``variant`` against ``baselines`` over ``settings``:
    label -> text (the labels of ``CLAIMS``)."""
    # over the seeds the variant and every baseline have finished: a partial setting would
    # compare it with whichever baselines happen to have finished, or on other seeds
    shared = [m for s in settings if (m := s.means([variant, *baselines])) is not None]
    texts = {"compared": (f"{len(shared)}; seeds each: {span([len(s.seeds) for s in shared], 'd')}"
                          if shared else "0")}
    # converges fastest: the settings where it or a baseline reaches the target in every seed
    raced = [s for s in shared if any(m in s.rounds for m in (variant, *baselines))]
    won = [s for s in raced if variant in s.rounds
           and all(s.rounds[variant] <= s.rounds[b] for b in baselines if b in s.rounds)]
    lost = [f"{s.label}: {min((b for b in baselines if b in s.rounds), key=s.rounds.__getitem__)}"
            for s in raced if s not in won]
    texts["fastest"] = (f"{len(won)} of {len(raced)}"
                        + (f" (fastest elsewhere: {'; '.join(lost)})" if lost else ""))
    # best accuracy, and the gap to the best baseline
    gaps = {s.label: lead(s.max_accuracy, variant, baselines) for s in shared}
    texts["best accuracy"] = lead_text(gaps)
    # the same at the last round: a run that collapsed after its peak keeps its Max Acc
    texts["final accuracy"] = lead_text({s.label: lead(s.final_accuracy, variant, baselines)
                                         for s in shared})
    # fewer rounds: against the fastest and against the slowest baseline that reaches it
    fewer = []
    for s in shared:
        reached = sorted((s.rounds[b], b) for b in baselines if b in s.rounds)
        if variant in s.rounds and reached:
            for rounds, baseline in (reached[0], reached[-1]):
                fewer.append((100 * (rounds - s.rounds[variant]) / rounds, s.label, baseline,
                              rounds, s.rounds[variant]))
    picks = {which: max(fewer[start::2]) for which, start in (("fastest", 0), ("slowest", 1))
             if fewer}
    if picks and picks["slowest"][1:3] == picks["fastest"][1:3]:
        picks = {"only": picks["fastest"]}  # one baseline reaches the target there
    texts["fewer rounds"] = "; ".join(
        f"{pick[0]:+.1f}% against the {which} baseline reaching the target ({pick[1]}, "
        f"{pick[2]}: {pick[3]:.1f} → {pick[4]:.1f} rounds)"
        for which, pick in picks.items()) or "—"
    # more accuracy: over the best baseline, and over any baseline
    over_any = [(100 * (s.max_accuracy[variant] - s.max_accuracy[b]), s.label, b)
                for s in shared for b in baselines]
    if gaps:
        label = max(gaps, key=gaps.__getitem__)
        points, where, baseline = max(over_any)
        texts["more accuracy"] = (f"{gaps[label]:+.2f} points over the best baseline "
                                  f"({label}); {points:+.2f} over any ({where}, {baseline})")
    else:
        texts["more accuracy"] = "—"
    texts["p_theta against p_phi"] = degree_text(shared, variant)
    return texts


def lead(accuracy: Mapping[str, float], variant: str, baselines: Sequence[str]) -> float:
    """The variant's ``accuracy`` (method -> fraction) minus the best baseline's, in points."""
    return 100 * (accuracy[variant] - max(accuracy[b] for b in baselines))


def lead_text(gaps: Mapping[str, float]) -> str:
    """'k of n; against the best baseline low to high points' for per-setting ``gaps``."""
    if not gaps:
        return "—"
    ahead = sum(gap >= 0 for gap in gaps.values())
    return (f"{ahead} of {len(gaps)}; against the best baseline "
            f"{span(list(gaps.values()), '+.2f')} points")


def degree_text(settings: Sequence[Means], variant: str) -> str:
    """Mean p_theta and p_phi over rounds (range over settings) and their largest gap."""
    runs = [(s.label, s.degrees[variant]) for s in settings if s.degrees.get(variant)]
    if not runs:
        return "—"
    theta = [statistics.fmean(p for p, _ in rows) for _, rows in runs]
    phi = [statistics.fmean(p for _, p in rows) for _, rows in runs]
    gap, label, round_ = max((abs(t - f), label, i + 1) for label, rows in runs
                             for i, (t, f) in enumerate(rows))
    return (f"mean over rounds p_θ {span(theta)}, p_φ {span(phi)}; largest gap {gap:.2f} "
            f"({label}, round {round_})")


def span(values: Sequence[float], spec: str = ".2f") -> str:
    """'low to high' of ``values`` (a range over settings) in format ``spec``, or one value
    where both print the same."""
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low} to {high}"


CLAIMS = {  # label -> the paper's wording
    "compared": "settings compared (where it and every baseline finished a seed)",
    "fastest": "converges fastest (settings where no baseline reaches the target sooner)",
    "best accuracy": "reaches the best accuracy (settings where no baseline's Max Acc is higher)",
    "final accuracy": "ends the most accurate (settings where no baseline's last-round accuracy "
                      "is higher)",
    "fewer rounds": "up to 98.63% fewer rounds",
    "more accuracy": "up to 4.87% more accuracy",
    "p_theta against p_phi": "p_θ (conv/embedding layers) against p_φ (classifier)",
}


def claims_table(workloads: Mapping[str, Sequence[Sweep]], out_dirs: Mapping[str, Path]
                 ) -> str:
    """Markdown: a row per claim and HyperPrism variant, a column per workload."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    coverage = {}
    for workload, sweeps in workloads.items():
        settings = [s for sweep in sweeps for s in load_settings(sweep, out_dirs[sweep.name])]
        methods = {m: sweep.algorithm(m) for sweep in sweeps for m in sweep.methods}
        baselines = [m for m, a in methods.items() if a not in NOT_A_BASELINE]
        cells = sum(len(sweep.cells()) for sweep in sweeps)
        done = sum(len(seeds) for s in settings for seeds in s.runs.values())
        coverage[workload] = f"{done} of {cells} cells, {len(settings)} settings"
        for variant in (m for m, a in methods.items() if a == "hyperprism"):
            for claim, text in claim_texts(settings, variant, baselines).items():
                rows.setdefault((claim, variant), {})[workload] = text
    names = list(workloads)
    lines = ["| claim | HyperPrism | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names),
             "| (finished) | | " + " | ".join(coverage[n] for n in names) + " |"]
    lines += [f"| {CLAIMS[claim]} | {variant} | "
              + " | ".join(texts.get(n, "—") for n in names) + " |"
              for (claim, variant), texts in sorted(rows.items(),
                                                    key=lambda r: list(CLAIMS).index(r[0][0]))]
    return "\n".join(lines) + "\n"


def load_claims_file(path: Path) -> dict[str, list[Sweep]]:
    spec = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path)))
    if set(spec) != {"workloads"} or not isinstance(spec["workloads"], dict):
        raise ValueError(f"claims file {path}: give exactly 'workloads', a mapping from a "
                         f"workload's name to its sweep files, e.g. "
                         f"workloads: {{MNIST LR: [table2_alpha.yaml]}}")
    return {name: [Sweep.load(path.parent / file) for file in files]
            for name, files in spec["workloads"].items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("claims", type=Path, help="a claims YAML file under simulations/")
    parser.add_argument("--results", type=Path,
                        help="the folder holding each sweep's results as <sweep name>/ "
                             "(default: simulations/results, where the sweeps write them)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    workloads = load_claims_file(args.claims)
    out_dirs = {s.name: args.results / s.name if args.results else results_dir(s)
                for sweeps in workloads.values() for s in sweeps}
    table = claims_table(workloads, out_dirs)
    if args.out:
        args.out.write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
