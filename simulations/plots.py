"""PNG plots of a finished sweep (needs matplotlib: ``pip install -e '.[plots]'``).

Over seeds, "std" is the sample std (as in ``table.md``); over nodes, the population std (as
in the metrics rows).

- ``curves.png``: mean node accuracy per round, mean ± std over seeds (shaded), one panel per
  swept value and a line per method (the paper's Fig. 3);
- ``p_degrees.png``: HyperPrism's p_theta and p_phi per round, mean ± std over nodes (seed of
  the first cell), one panel per swept value (the per-node diagnostics reviewers asked for);
- ``p_nodes.png``: every node's p_theta (top) and p_phi (bottom) per round for HyperPrism (seed
  of the first cell), one line per node coloured by its label skew (the largest class share of
  its partition), one column per swept value; ``p_nodes_tracking.png`` the same for a method
  with learned degrees (p-mode tracking);
- ``accuracy_vs_p.png`` for a sweep over ``fixed_p``: Max Acc and Conv. Rds against p, mean ±
  std over seeds (Fig. 2a/b).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flwr_hyperprism.config import RunConfig  # noqa: E402
from flwr_hyperprism.metrics import node_values  # noqa: E402
from strategies.learner import partitioned  # noqa: E402

from .sweep_file import REFERENCE_METHOD, Sweep, cell_rows  # noqa: E402

DEGREES = (("p_theta", "p_θ (representation)"), ("p_phi", "p_φ (decision)"))  # row key, label


def plot_sweep(sweep: Sweep, out: Path) -> list[Path]:
    """Write the sweep's plots into ``out``; returns their paths."""
    written = [plot_curves(sweep, out)]
    per_node = per_node_degree_methods(sweep)
    if REFERENCE_METHOD in per_node:
        written.append(plot_degrees(sweep, out))
    for method, name in per_node.items():
        written.append(plot_node_degrees(sweep, out, method, name))
    if sweep.key == "fixed_p":
        written.append(plot_accuracy_vs_p(sweep, out))
    return written


def seed_std(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """The sample std over seeds, as the tables give it (0 for a single seed)."""
    return values.std(axis=axis, ddof=1) if values.shape[axis] > 1 else np.zeros(
        np.delete(values.shape, axis))


def _panels(count: int):
    fig, axes = plt.subplots(1, count, figsize=(4.5 * count, 3.6), squeeze=False, sharey=True)
    return fig, axes[0]


def plot_curves(sweep: Sweep, out: Path) -> Path:
    fig, axes = _panels(len(sweep.values))
    cells = sweep.cells()
    for ax, value in zip(axes, sweep.values):
        for method in sweep.methods:
            runs = [[r["accuracy_mean"] for r in cell_rows(out, sweep, c)]
                    for c in cells if c.method == method and c.value == value]
            length = min(len(r) for r in runs)
            acc = 100 * np.array([r[:length] for r in runs])
            mean, std = acc.mean(axis=0), seed_std(acc)
            rounds = np.arange(length)
            ax.plot(rounds, mean, label=method)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
        ax.set(title=f"{sweep.key} = {value}", xlabel="round", ylabel="mean node accuracy (%)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    return _save(fig, out / "curves.png")


def plot_degrees(sweep: Sweep, out: Path) -> Path:
    fig, axes = _panels(len(sweep.values))
    for ax, value in zip(axes, sweep.values):
        cell = next(c for c in sweep.cells() if c.method == REFERENCE_METHOD and c.value == value)
        rows = [r for r in cell_rows(out, sweep, cell) if "p_theta" in r]
        for key, label in DEGREES:
            degrees = np.array([node_values(r[key]) for r in rows])  # (rounds, nodes)
            # over nodes: the population std, as the rows' p_theta_std / p_phi_std
            mean, std = degrees.mean(axis=1), degrees.std(axis=1)
            rounds = np.array([r["round"] for r in rows])
            ax.plot(rounds, mean, label=label)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
        ax.set(title=f"{sweep.key} = {value}, seed {cell.seed}", xlabel="round",
               ylabel="degree p (mean ± std over nodes)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    return _save(fig, out / "p_degrees.png")


def label_skew(config: RunConfig) -> list[float]:
    """Per partition: the share of its samples in its most frequent class (1/10 = balanced)."""
    data, parts = partitioned(config.dataset, config.data_dir, config.download, config.seed,
                              config.num_nodes, config.alpha, config.min_partition_size)
    labels = data.train.y.numpy()
    return [float(np.bincount(labels[idx]).max() / len(idx)) for idx in parts]


def per_node_degree_methods(sweep: Sweep) -> dict[str, str]:
    """The methods whose nodes choose their own degrees (p-mode hypernetwork or tracking),
    each with its plot's file name: p_nodes.png for HyperPrism, p_nodes_<p-mode>.png else."""
    methods = {}
    for method, settings in sweep.methods.items():
        if settings.get("algorithm", sweep.base.algorithm) != "hyperprism":
            continue
        p_mode = settings.get("p_mode", sweep.base.p_mode)
        if p_mode in ("hypernetwork", "tracking"):
            methods[method] = ("p_nodes.png" if method == REFERENCE_METHOD
                               else f"p_nodes_{p_mode}.png")
    return methods


def plot_node_degrees(sweep: Sweep, out: Path, method: str, name: str) -> Path:
    fig, axes = plt.subplots(2, len(sweep.values), figsize=(4.5 * len(sweep.values), 6.4),
                             squeeze=False, sharex=True)
    colours = plt.get_cmap("viridis")
    for column, value in enumerate(sweep.values):
        cell = next(c for c in sweep.cells() if c.method == method and c.value == value)
        rows = [r for r in cell_rows(out, sweep, cell) if "p_theta" in r]
        skew = label_skew(cell.config)
        rounds = [r["round"] for r in rows]
        for row_index, (key, label) in enumerate(DEGREES):
            ax = axes[row_index][column]
            degrees = np.array([node_values(r[key]) for r in rows])  # (rounds, nodes)
            for node in range(degrees.shape[1]):
                ax.plot(rounds, degrees[:, node], color=colours(skew[node]), lw=0.8, alpha=0.8)
            ax.set(title=f"{sweep.key} = {value}, seed {cell.seed}")
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


def plot_accuracy_vs_p(sweep: Sweep, out: Path) -> Path:
    """Max Acc and Conv. Rds against p, mean ± std over seeds (seeds that never reach the
    target are left out of the rounds panel)."""
    fig, (acc_ax, rounds_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    cells = sweep.cells()
    for method in sweep.methods:
        summaries = [[json.loads((out / "cells" / c.id(sweep.key) / "summary.json").read_text())
                      for c in cells if c.method == method and c.value == value]
                     for value in sweep.values]
        accuracy = [[100 * s["max_accuracy"] for s in seeds] for seeds in summaries]
        rounds = [[s["rounds_to_target"] for s in seeds if s["rounds_to_target"] is not None]
                  for seeds in summaries]
        for ax, values in ((acc_ax, accuracy), (rounds_ax, rounds)):
            ax.errorbar(sweep.values, [np.mean(v) if v else np.nan for v in values],
                        yerr=[seed_std(np.array(v)) if v else np.nan for v in values],
                        marker="o",
                        capsize=3, label=method)
    acc_ax.set(xlabel="fixed p", ylabel="Max Acc (%)")
    rounds_ax.set(xlabel="fixed p", ylabel=f"Conv. Rds (>= {sweep.base.target_accuracy:.0%})")
    for ax in (acc_ax, rounds_ax):
        ax.grid(alpha=0.3)
    rounds_ax.legend(fontsize="small")
    fig.suptitle(sweep.title)
    return _save(fig, out / "accuracy_vs_p.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
