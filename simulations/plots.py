"""PNG plots of a sweep (needs matplotlib: ``pip install -e '.[plots]'``).

Over seeds, "std" is the sample std (as in ``table.md``); over nodes, the population std (as
in the metrics rows).

- ``curves.png``: mean node accuracy per round, mean ± std over seeds (shaded), one panel per
  swept value and a line per method (the paper's Fig. 3);
- ``p_degrees.png``: p_theta (solid) against p_phi (dashed) per round, mean ± std over nodes
  (each method's lowest seed shown), for every method whose nodes choose their degrees, one
  panel per swept value: do the representation and the decision layers get different degrees?
- ``p_nodes.png``: every node's p_theta (top) and p_phi (bottom) per round for HyperPrism
  (lowest seed shown), one line per node coloured by its label skew (the largest class share
  of its partition), one column per swept value; ``p_nodes_<p-mode>.png`` the same for another
  row whose nodes choose their degrees (``p_nodes_tracking.png``, ``p_nodes_hypernetwork.png``,
  ``p_nodes_descent.png``);
- ``accuracy_vs_p.png`` for a sweep over ``fixed_p``: Max Acc and Conv. Rds against p, mean ±
  std over seeds (Fig. 2a/b).

Each plot shows the cells it is given (``plot_sweep``'s ``cells``: the finished ones), so a
partial sweep has partial plots.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flwr_hyperprism.orchestration.metrics import node_values  # noqa: E402
from flwr_hyperprism.setup.config import RunConfig  # noqa: E402
from strategies.base.learner import partitioned  # noqa: E402
from strategies.hyperprism import HyperPrismSettings  # noqa: E402

from .sweep_file import REFERENCE_METHOD, Cell, Sweep, cell_rows, file_name  # noqa: E402

DEGREES = (("p_theta", "p_θ (representation)"), ("p_phi", "p_φ (decision)"))  # row key, label


def plot_sweep(sweep: Sweep, out: Path, cells: Sequence[Cell]) -> list[Path]:
    """Write the plots of ``cells`` (cells of ``sweep`` whose runs are in ``out``) into
    ``out``; returns their paths. A plot with no cell to show is not written."""
    written = [plot_curves(sweep, out, cells)] if cells else []
    per_node = per_node_degree_methods(sweep)
    if any(c.method in per_node for c in cells):
        written.append(plot_degrees(sweep, out, [c for c in cells if c.method in per_node]))
    for method, name in per_node.items():
        if any(c.method == method for c in cells):
            written.append(plot_node_degrees(sweep, out, [c for c in cells if c.method == method],
                                             method, name))
    if sweep.key == "fixed_p" and cells:
        written.append(plot_accuracy_vs_p(sweep, out, cells))
    return written


def seed_std(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """The sample std over seeds, as the tables give it (0 for a single seed)."""
    return values.std(axis=axis, ddof=1) if values.shape[axis] > 1 else np.zeros(
        np.delete(values.shape, axis))


def _panels(count: int):
    fig, axes = plt.subplots(1, count, figsize=(4.5 * count, 3.6), squeeze=False, sharey=True)
    return fig, axes[0]


def shown_values(sweep: Sweep, cells: Sequence[Cell]) -> list[object]:
    """The swept values that have at least one of ``cells``, in the sweep's order."""
    return [v for v in sweep.values if any(c.value == v for c in cells)]


def lowest_seed_cell(cells: Sequence[Cell], method: str, value: object) -> Cell | None:
    """The cell of ``method`` at ``value`` with the lowest seed, None when there is none."""
    matching = sorted((c for c in cells if c.method == method and c.value == value),
                      key=lambda c: c.seed)
    return matching[0] if matching else None


def colour(sweep: Sweep, method: str) -> str:
    """The method's colour, the same in every plot and panel."""
    return f"C{list(sweep.methods).index(method) % 10}"


def _legend(axes: Sequence[Any]) -> None:
    """One legend, right of the last panel (clear of every curve), with every line of every
    panel (a method may be missing from some panels in a partial sweep)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    axes[-1].legend(entries.values(), entries.keys(), fontsize="small", loc="upper left",
                    bbox_to_anchor=(1.02, 1.0))


def plot_curves(sweep: Sweep, out: Path, cells: Sequence[Cell]) -> Path:
    values = shown_values(sweep, cells)
    fig, axes = _panels(len(values))
    for ax, value in zip(axes, values):
        for method in sweep.methods:
            runs = [[r["accuracy_mean"] for r in cell_rows(out, sweep, c)]
                    for c in cells if c.method == method and c.value == value]
            if not runs:
                continue
            length = min(len(r) for r in runs)
            acc = 100 * np.array([r[:length] for r in runs])
            mean, std = acc.mean(axis=0), seed_std(acc)
            rounds = np.arange(length)
            ax.plot(rounds, mean, label=method, color=colour(sweep, method))
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2,
                            color=colour(sweep, method))
        ax.set(title=f"{sweep.key} = {value}", xlabel="round", ylabel="mean node accuracy (%)")
        ax.grid(alpha=0.3)
    _legend(axes)
    return _save(fig, out / "curves.png")


def plot_degrees(sweep: Sweep, out: Path, cells: Sequence[Cell]) -> Path:
    """p_theta (solid) and p_phi (dashed) of each method of ``cells`` (those whose nodes
    choose their degrees), mean ± std over nodes, the lowest seed of each."""
    values = shown_values(sweep, cells)
    fig, axes = _panels(len(values))
    for ax, value in zip(axes, values):
        seeds = set()
        for method in sweep.methods:
            cell = lowest_seed_cell(cells, method, value)
            if cell is None:
                continue
            seeds.add(cell.seed)
            rows = [r for r in cell_rows(out, sweep, cell) if "p_theta" in r]
            rounds = np.array([r["round"] for r in rows])
            for (key, label), style in zip(DEGREES, ("-", "--")):
                degrees = np.array([node_values(r[key]) for r in rows])  # (rounds, nodes)
                # over nodes: the population std, as the rows' p_theta_std / p_phi_std
                mean, std = degrees.mean(axis=1), degrees.std(axis=1)
                ax.plot(rounds, mean, style, color=colour(sweep, method),
                        label=f"{method}: {label}")
                ax.fill_between(rounds, mean - std, mean + std, alpha=0.15,
                                color=colour(sweep, method))
        ax.set(title=f"{sweep.key} = {value}, seed {', '.join(map(str, sorted(seeds)))}",
               xlabel="round", ylabel="degree p (mean ± std over nodes)")
        ax.grid(alpha=0.3)
    _legend(axes)
    return _save(fig, out / "p_degrees.png")


def label_skew(config: RunConfig) -> list[float]:
    """Per partition: the share of its samples in its most frequent class (1/10 = balanced)."""
    data, parts = partitioned(config.dataset, config.data_dir, config.download, config.seed,
                              config.num_nodes, config.alpha, config.min_partition_size,
                              config.validation_fraction)
    labels = data.train.y.numpy()
    return [float(np.bincount(labels[idx]).max() / len(idx)) for idx in parts]


def per_node_degree_methods(sweep: Sweep) -> dict[str, str]:
    """The methods whose nodes choose their own degrees (p-mode descent, tracking or
    hypernetwork),
    each with its plot's file name: p_nodes.png for HyperPrism, p_nodes_<p-mode>.png else
    (p_nodes_<method>.png for a second method of that p-mode)."""
    methods: dict[str, str] = {}
    for method, settings in sweep.methods.items():
        if sweep.algorithm(method) != "hyperprism":
            continue
        p_mode = HyperPrismSettings.of(sweep.base.replace(**settings)).p_mode
        if p_mode in ("descent", "hypernetwork", "tracking"):
            name = "p_nodes.png" if method == REFERENCE_METHOD else f"p_nodes_{p_mode}.png"
            if name in methods.values():
                name = f"p_nodes_{file_name(method)}.png"
            methods[method] = name
    return methods


def plot_node_degrees(sweep: Sweep, out: Path, cells: Sequence[Cell], method: str,
                      name: str) -> Path:
    """Every node's degrees for ``method``: one column per swept value of ``cells``."""
    columns = [c for v in sweep.values if (c := lowest_seed_cell(cells, method, v)) is not None]
    fig, axes = plt.subplots(2, len(columns), figsize=(4.5 * len(columns) + 1.5, 6.4),
                             squeeze=False, sharex=True)
    colours = plt.get_cmap("viridis")
    for column, cell in enumerate(columns):
        rows = [r for r in cell_rows(out, sweep, cell) if "p_theta" in r]
        skew = label_skew(cell.config)
        rounds = [r["round"] for r in rows]
        for row_index, (key, label) in enumerate(DEGREES):
            ax = axes[row_index][column]
            degrees = np.array([node_values(r[key]) for r in rows])  # (rounds, nodes)
            for node in range(degrees.shape[1]):
                ax.plot(rounds, degrees[:, node], color=colours(skew[node]), lw=0.8, alpha=0.8)
            ax.set(title=f"{sweep.key} = {cell.value}, seed {cell.seed}")
            ax.grid(alpha=0.3)
            if column == 0:
                ax.set(ylabel=f"{label} per node")
        axes[1][column].set(xlabel="round")
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=colours),
                       ax=axes, shrink=0.8)
    bar.set_label("label skew: largest class share of the node's data")
    fig.suptitle(f"{method}: every node's degrees")
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return out / name


def plot_accuracy_vs_p(sweep: Sweep, out: Path, cells: Sequence[Cell]) -> Path:
    """Max Acc and Conv. Rds against p, mean ± std over seeds (seeds that never reach the
    target are left out of the rounds panel)."""
    fig, (acc_ax, rounds_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for method in sweep.methods:
        values = shown_values(sweep, [c for c in cells if c.method == method])
        if not values:
            continue
        summaries = [[json.loads((out / "cells" / c.id(sweep.key) / "summary.json").read_text())
                      for c in cells if c.method == method and c.value == value]
                     for value in values]
        accuracy = [[100 * s["max_accuracy"] for s in seeds] for seeds in summaries]
        rounds = [[s["rounds_to_target"] for s in seeds if s["rounds_to_target"] is not None]
                  for seeds in summaries]
        for ax, measured in ((acc_ax, accuracy), (rounds_ax, rounds)):
            ax.errorbar(values, [np.mean(v) if v else np.nan for v in measured],
                        yerr=[seed_std(np.array(v)) if v else np.nan for v in measured],
                        marker="o", capsize=3, label=method, color=colour(sweep, method))
    acc_ax.set(xlabel="fixed p", ylabel="Max Acc (%)")
    rounds_ax.set(xlabel="fixed p", ylabel=f"Conv. Rds (>= {sweep.base.target_accuracy:.0%})")
    for ax in (acc_ax, rounds_ax):
        ax.grid(alpha=0.3)
    rounds_ax.legend(fontsize="small")
    fig.suptitle(sweep.title)
    return _save(fig, out / "accuracy_vs_p.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": keeps the outside legend
    plt.close(fig)
    return path
