"""Time-varying communication graphs and their Metropolis-Hastings mixing weights.

A ``TimeVaryingGraph`` gives the graph G(t) of round t on nodes 0..m-1 (partition ids). Every
graph is a pure function of ``(seed, round)``, so a run can be replayed or resumed at any round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np

from .seeding import round_rng, round_seed

TOPOLOGIES = ("erdos-renyi", "mobility", "ring", "complete")


@dataclass(frozen=True)
class TimeVaryingGraph:
    """Graph schedule G(t) on ``num_nodes`` nodes.

    Topologies:
      - ``erdos-renyi``: an independent G(m, density) per round (``exact_edges``: exactly
        round(density * m(m-1)/2) edges, G(m, M)).
      - ``mobility``: nodes move in the unit square (random direction, step ``speed`` per round,
        reflected at the walls) and link when closer than a radio range chosen so that the
        expected density of uniformly placed nodes equals ``density``; links persist and change
        gradually.
      - ``ring``, ``complete``: static graphs (for tests and sanity checks).
    """

    num_nodes: int
    topology: str = "erdos-renyi"
    density: float = 0.5
    seed: int = 0
    exact_edges: bool = False
    speed: float = 0.05

    def __post_init__(self) -> None:
        if self.num_nodes < 2:
            raise ValueError(f"num_nodes must be >= 2, got {self.num_nodes}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; valid: {', '.join(TOPOLOGIES)}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not self.speed >= 0.0:
            raise ValueError(f"mobility speed must be >= 0, got {self.speed}")

    def at(self, round_: int) -> nx.Graph:
        """The graph of round ``round_`` (1-based), nodes 0..num_nodes-1."""
        m = self.num_nodes
        if self.topology == "complete":
            return nx.complete_graph(m)
        if self.topology == "ring":
            return nx.cycle_graph(m)
        if self.topology == "mobility":
            return _disk_graph(self._positions(round_), self.radio_range)
        seed = round_seed(self.seed, round_)
        if self.exact_edges:
            return nx.gnm_random_graph(m, round(self.density * m * (m - 1) / 2), seed=seed)
        return nx.gnp_random_graph(m, self.density, seed=seed)

    @property
    def radio_range(self) -> float:
        """Range r with P(|X - Y| < r) = density for X, Y uniform in the unit square."""
        lo, hi = 0.0, math.sqrt(2.0)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _square_distance_cdf(mid) < self.density else (lo, mid)
        return hi

    def _positions(self, round_: int) -> np.ndarray:
        # A pure function of (seed, round): replay the walk from round 1 (cheap for m, T <= 1e3).
        rng = round_rng(self.seed, 0)
        pos = rng.random((self.num_nodes, 2))
        for t in range(2, round_ + 1):
            angle = round_rng(self.seed, t).uniform(0.0, 2 * math.pi, self.num_nodes)
            pos = pos + self.speed * np.stack([np.cos(angle), np.sin(angle)], axis=1)
            pos = np.abs(pos)  # reflect at 0
            pos = 1.0 - np.abs(1.0 - pos)  # reflect at 1
        return pos


def _square_distance_cdf(r: float) -> float:
    """P(|X - Y| <= r) for independent uniform points X, Y in the unit square."""
    if r <= 1.0:
        return math.pi * r**2 - 8.0 * r**3 / 3.0 + r**4 / 2.0
    if r >= math.sqrt(2.0):
        return 1.0
    q = math.sqrt(r**2 - 1.0)
    return (1.0 / 3.0 + (math.pi - 2.0) * r**2 - r**4 / 2.0 + 4.0 / 3.0 * (2 * r**2 + 1) * q
            - 4.0 * r**2 * math.acos(1.0 / r))


def _disk_graph(pos: np.ndarray, radius: float) -> nx.Graph:
    graph = nx.empty_graph(len(pos))
    dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    rows, cols = np.nonzero(np.triu(dist < radius, k=1))
    graph.add_edges_from(zip(rows.tolist(), cols.tolist()))
    return graph


def random_maximal_matching(graph: nx.Graph, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A random maximal matching: edges in random order, each kept if both ends are free.

    Returns (i, j) pairs with i < j; every edge of ``graph`` has at least one matched end.
    """
    edges = sorted((min(i, j), max(i, j)) for i, j in graph.edges())
    matched: set[int] = set()
    pairs = []
    for index in rng.permutation(len(edges)):
        i, j = edges[index]
        if i not in matched and j not in matched:
            matched.update((i, j))
            pairs.append((i, j))
    return sorted(pairs)


def metropolis_hastings_weights(graph: nx.Graph) -> np.ndarray:
    """Mixing matrix A with a_ij = 1 / (1 + max(d_i, d_j)) on edges, a_ii = 1 - sum_j a_ij.

    Returns a float64 (m, m) matrix that is symmetric and doubly stochastic; an isolated node
    gets a_ii = 1 (it keeps its model).
    """
    m = graph.number_of_nodes()
    degree = np.array([graph.degree(i) for i in range(m)])
    weights = np.zeros((m, m))
    for i, j in graph.edges():
        weights[i, j] = weights[j, i] = 1.0 / (1.0 + max(degree[i], degree[j]))
    weights[np.diag_indices(m)] = 1.0 - weights.sum(axis=1)
    return weights


def gossip_matrix(graph: nx.Graph) -> np.ndarray:
    """W = Lap / lambda_max(Lap): symmetric PSD, W 1 = 0, largest eigenvalue 1 (0 if no edges).

    Returns a float64 (m, m) matrix; the gossip matrix of ADOM+ and, as I - W, Mudag's mixing
    matrix.
    """
    adjacency = nx.to_numpy_array(graph, nodelist=range(graph.number_of_nodes()))
    laplacian = np.diag(adjacency.sum(axis=1)) - adjacency
    top = np.linalg.eigvalsh(laplacian)[-1]
    return laplacian / top if top > 0 else np.zeros_like(laplacian)


MAX_MIXING_LAMBDA2 = 1.0 - 1e-3  # a disconnected graph has lambda_2 = 1: no finite FastMix


def fastmix_momentum(lambda2: float) -> float:
    """FastMix's eta_w = (1 - sqrt(1 - l^2)) / (1 + sqrt(1 - l^2)), l = min(lambda2, 1 - 1e-3)."""
    root = math.sqrt(1.0 - min(lambda2, MAX_MIXING_LAMBDA2) ** 2)
    return (1.0 - root) / (1.0 + root)


def fastmix_steps(lambda2: float, kappa: float, factor: float, cap: int) -> int:
    """K = ceil(factor * ln(kappa) / sqrt(1 - lambda2)) gossip steps, at least 1, at most ``cap``.

    ``lambda2`` (the second largest eigenvalue of the mixing matrix) is clamped to 1 - 1e-3,
    as for ``fastmix_momentum``.
    """
    gap = 1.0 - min(lambda2, MAX_MIXING_LAMBDA2)
    return min(cap, max(1, math.ceil(factor * math.log(kappa) / math.sqrt(gap))))
