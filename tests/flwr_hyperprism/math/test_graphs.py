"""Tests of the time-varying graphs and Metropolis-Hastings weights."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from flwr_hyperprism.math.graphs import (
    MAX_MIXING_LAMBDA2,
    TimeVaryingGraph,
    _square_distance_cdf,
    fastmix_momentum,
    fastmix_steps,
    gossip_matrix,
    metropolis_hastings_weights,
)

# --- helpers -------------------------------------------------------------------------------------


def edge_set(graph: nx.Graph) -> set[tuple[int, int]]:
    return {(min(i, j), max(i, j)) for i, j in graph.edges()}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def mean_density(schedule: TimeVaryingGraph, rounds) -> float:
    return float(np.mean([nx.density(schedule.at(t)) for t in rounds]))


def mean_persistence(schedule: TimeVaryingGraph, rounds: int) -> float:
    """Average Jaccard similarity of the edge sets of consecutive rounds 1..rounds."""
    edges = [edge_set(schedule.at(t)) for t in range(1, rounds + 1)]
    return float(np.mean([jaccard(a, b) for a, b in zip(edges, edges[1:])]))


def with_isolated_nodes() -> nx.Graph:
    graph = nx.path_graph(5)
    graph.add_nodes_from([5, 6])
    return graph


GRAPHS = {
    "gnp-sparse": nx.gnp_random_graph(12, 0.2, seed=1),
    "gnp-dense": nx.gnp_random_graph(12, 0.8, seed=2),
    "star": nx.star_graph(7),
    "path": nx.path_graph(6),
    "ring": nx.cycle_graph(9),
    "isolated-nodes": with_isolated_nodes(),
    "no-edges": nx.empty_graph(4),
    "mobility": TimeVaryingGraph(15, "mobility", 0.3, seed=3).at(4),
}


# --- Metropolis-Hastings weights --------------------------------------------------------


@pytest.mark.parametrize("graph", GRAPHS.values(), ids=GRAPHS.keys())
def test_mh_weights_symmetric_doubly_stochastic_nonnegative(graph):
    weights = metropolis_hastings_weights(graph)
    m = graph.number_of_nodes()

    assert weights.shape == (m, m) and weights.dtype == np.float64
    np.testing.assert_array_equal(weights, weights.T)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (weights >= 0).all()


@pytest.mark.parametrize("graph", GRAPHS.values(), ids=GRAPHS.keys())
def test_mh_weights_follow_the_formula_and_vanish_off_edges(graph):
    weights = metropolis_hastings_weights(graph)
    degree = dict(graph.degree())
    edges = edge_set(graph)

    for i in range(graph.number_of_nodes()):
        for j in range(graph.number_of_nodes()):
            if i == j:
                continue
            expected = 1 / (1 + max(degree[i], degree[j])) if (min(i, j), max(i, j)) in edges else 0
            assert weights[i, j] == pytest.approx(expected, abs=1e-15)


def test_mh_isolated_node_keeps_its_model():
    weights = metropolis_hastings_weights(with_isolated_nodes())

    for node in (5, 6):
        expected = np.zeros(7)
        expected[node] = 1.0
        np.testing.assert_array_equal(weights[node], expected)


@pytest.mark.parametrize("m", (2, 3, 7, 50))
def test_mh_complete_graph_is_uniform(m):
    np.testing.assert_allclose(metropolis_hastings_weights(nx.complete_graph(m)), 1.0 / m,
                               rtol=1e-12)


# --- schedules -----------------------------------------------------------------------------------

RANDOM_TOPOLOGIES = ("erdos-renyi", "mobility")


@pytest.mark.parametrize("exact_edges", (False, True))
@pytest.mark.parametrize("topology", RANDOM_TOPOLOGIES)
def test_same_seed_and_round_give_same_edges(topology, exact_edges):
    def schedule(seed):
        return TimeVaryingGraph(20, topology, 0.4, seed=seed, exact_edges=exact_edges)

    first, again = schedule(5), schedule(5)
    for t in (1, 2, 7):
        assert edge_set(first.at(t)) == edge_set(again.at(t))
        assert set(first.at(t).nodes()) == set(range(20))
    assert edge_set(first.at(3)) != edge_set(first.at(4))  # the graph changes every round
    assert edge_set(first.at(3)) != edge_set(schedule(6).at(3))  # and with the seed


def test_rounds_are_independent_of_query_order():
    schedule = TimeVaryingGraph(20, "mobility", 0.5, seed=1)
    forward = [edge_set(schedule.at(t)) for t in range(1, 6)]
    backward = [edge_set(schedule.at(t)) for t in range(5, 0, -1)][::-1]

    assert forward == backward


@pytest.mark.parametrize("density", (0.2, 0.5, 0.8))
def test_erdos_renyi_density_close_to_target(density):
    # 40 rounds x 435 pairs: the standard error of the mean density is <= 0.004.
    schedule = TimeVaryingGraph(30, "erdos-renyi", density, seed=11)

    assert mean_density(schedule, range(1, 41)) == pytest.approx(density, abs=0.015)


@pytest.mark.parametrize("density", (0.1, 0.2, 0.5, 0.8, 1.0))
@pytest.mark.parametrize("m", (2, 5, 13, 30))
def test_exact_edges_gives_the_exact_count(m, density):
    schedule = TimeVaryingGraph(m, "erdos-renyi", density, seed=2, exact_edges=True)
    expected = round(density * m * (m - 1) / 2)

    assert {schedule.at(t).number_of_edges() for t in range(1, 6)} == {expected}


@pytest.mark.parametrize("density", (0.2, 0.5, 0.8))
def test_mobility_density_close_to_target(density):
    # Positions are correlated across rounds, so average over many seeds (an ensemble) at an
    # early and a late round; per-graph standard deviation ~0.07, 60 seeds -> ~0.01.
    densities = [mean_density(TimeVaryingGraph(20, "mobility", density, seed=s), (1, 30))
                 for s in range(60)]

    assert float(np.mean(densities)) == pytest.approx(density, abs=0.03)


@pytest.mark.parametrize("density", (0.2, 0.5, 0.8))
def test_mobility_links_persist_between_rounds(density):
    def schedule(topology):
        return TimeVaryingGraph(30, topology, density, seed=4)

    mobility = mean_persistence(schedule("mobility"), 20)

    assert mobility >= 0.7
    assert mobility > mean_persistence(schedule("erdos-renyi"), 20) + 0.2


def test_mobility_with_zero_speed_is_static():
    schedule = TimeVaryingGraph(15, "mobility", 0.5, seed=9, speed=0.0)

    assert edge_set(schedule.at(1)) == edge_set(schedule.at(10))


@pytest.mark.parametrize("density", (0.05, 0.2, 0.5, 0.8, 0.99, 1.0))
def test_radio_range_inverts_the_distance_cdf(density):
    radius = TimeVaryingGraph(10, "mobility", density).radio_range

    assert 0 < radius <= math.sqrt(2)
    assert _square_distance_cdf(radius) == pytest.approx(density, abs=1e-9)


@pytest.mark.parametrize("radius", (0.05, 0.2, 0.5, 0.8, 1.0, 1.1, 1.25, 1.4))
def test_square_distance_cdf_matches_monte_carlo(radius):
    rng = np.random.default_rng(0)
    points = rng.random((2, 400_000, 2))
    empirical = float(np.mean(np.linalg.norm(points[0] - points[1], axis=1) <= radius))

    # Binomial standard error <= 0.0008 at 400k samples.
    assert _square_distance_cdf(radius) == pytest.approx(empirical, abs=0.004)


def test_square_distance_cdf_is_a_continuous_cdf():
    radii = np.linspace(0.0, 1.6, 1601)
    values = np.array([_square_distance_cdf(r) for r in radii])

    assert values[0] == 0.0 and values[-1] == 1.0
    assert (np.diff(values) >= -1e-12).all()
    assert _square_distance_cdf(1 - 1e-9) == pytest.approx(_square_distance_cdf(1 + 1e-9),
                                                           abs=1e-6)
    assert _square_distance_cdf(math.sqrt(2) - 1e-9) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("m", (2, 3, 8))
def test_ring_and_complete_are_static(m):
    ring, complete = TimeVaryingGraph(m, "ring"), TimeVaryingGraph(m, "complete")

    assert edge_set(ring.at(1)) == edge_set(ring.at(9)) == edge_set(nx.cycle_graph(m))
    assert complete.at(1).number_of_edges() == complete.at(9).number_of_edges() == m * (m - 1) // 2


BAD_SCHEDULES = {
    "num_nodes 1": dict(num_nodes=1),
    "num_nodes 0": dict(num_nodes=0),
    "topology star": dict(num_nodes=5, topology="star"),
    "density 0": dict(num_nodes=5, density=0.0),
    "density negative": dict(num_nodes=5, density=-0.1),
    "density above 1": dict(num_nodes=5, density=1.5),
    "density nan": dict(num_nodes=5, density=float("nan")),
    "speed negative": dict(num_nodes=5, topology="mobility", speed=-0.1),
}


@pytest.mark.parametrize("kwargs", BAD_SCHEDULES.values(), ids=BAD_SCHEDULES.keys())
def test_bad_schedule_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        TimeVaryingGraph(**kwargs)


def test_bad_schedule_message_names_value_and_choices():
    with pytest.raises(ValueError, match=r"'star'.*erdos-renyi.*mobility"):
        TimeVaryingGraph(5, topology="star")
    with pytest.raises(ValueError, match=r"density.*1\.5"):
        TimeVaryingGraph(5, density=1.5)


def test_gossip_matrix_is_a_scaled_laplacian():
    for round_ in (1, 2, 3):
        w = gossip_matrix(TimeVaryingGraph(12, seed=3).at(round_))
        eigenvalues = np.linalg.eigvalsh(w)
        assert np.allclose(w, w.T) and eigenvalues.min() > -1e-12
        assert np.isclose(eigenvalues.max(), 1.0) and np.allclose(w.sum(axis=1), 0.0)
        mixing = np.eye(12) - w  # Mudag's Wm: doubly stochastic
        assert np.allclose(mixing.sum(axis=0), 1.0) and np.allclose(mixing.sum(axis=1), 1.0)
    assert not gossip_matrix(nx.empty_graph(4)).any()


def test_fastmix_momentum_follows_the_formula_and_clamps_lambda2():
    assert fastmix_momentum(0.0) == 0.0
    root = math.sqrt(1 - 0.6**2)
    assert fastmix_momentum(0.6) == pytest.approx((1 - root) / (1 + root))
    assert fastmix_momentum(1.0) == fastmix_momentum(MAX_MIXING_LAMBDA2) < 1.0
    assert fastmix_momentum(0.3) < fastmix_momentum(0.6) < fastmix_momentum(0.9)


@pytest.mark.parametrize(("lambda2", "kappa", "factor", "cap", "steps"), [
    (0.0, 10.0, 1.0, 20, 3),  # ceil(ln 10) = 3
    (0.75, 10.0, 1.0, 20, 5),  # ceil(ln 10 / 0.5) = 5
    (0.75, 10.0, 2.0, 20, 10),
    (0.75, 10.0, 1.0, 4, 4),  # capped
    (1.0, 10.0, 1.0, 100, 73),  # disconnected: lambda2 clamped to 1 - 1e-3
    (0.5, 1.0, 1.0, 20, 1),  # kappa = 1: ln 1 = 0, still one exchange
])
def test_fastmix_steps(lambda2, kappa, factor, cap, steps):
    assert fastmix_steps(lambda2, kappa, factor, cap) == steps
