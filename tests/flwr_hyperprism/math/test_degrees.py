"""Degree schedules (p-mode schedule), the tracked degree's step (p-mode tracking) and the
descent degree (p-mode descent)."""

from __future__ import annotations

import math

import pytest
import torch

from flwr_hyperprism.math.degrees import (
    P_SCHEDULES,
    bounded_step,
    degree_grid,
    descent_degree,
    scheduled_degree,
    tracked_degree_step,
)
from flwr_hyperprism.math.mirror import inverse_sign_power, sign_power


@pytest.mark.parametrize(("kind", "expected"), [
    ("step", [15.0] * 10 + [1.0] * 3),
    ("linear", [15.0 - 1.4 * r for r in range(11)] + [1.0] * 2),
    ("cosine", [1.0 + 7.0 * (1.0 + math.cos(math.pi * r / 10)) for r in range(11)] + [1.0] * 2),
    ("exponential", [1.0 + 14.0 * math.exp(-r / 10) for r in range(13)]),
])
def test_each_schedule_follows_its_formula(kind, expected):
    degrees = [scheduled_degree(kind, round_, 15.0, 1.0, 10) for round_ in range(1, 14)]
    assert degrees == pytest.approx(expected, abs=1e-12)
    assert degrees[0] == 15.0 and all(a >= b for a, b in zip(degrees, degrees[1:]))


def test_bad_schedule_arguments_are_errors_naming_the_fix():
    with pytest.raises(ValueError, match=r"unknown p-schedule 'sawtooth'; valid: "
                                         + ", ".join(P_SCHEDULES)):
        scheduled_degree("sawtooth", 1, 15.0, 1.0, 10)
    with pytest.raises(ValueError, match=r"round \(0\) and horizon \(10\) must be >= 1"):
        scheduled_degree("step", 0, 15.0, 1.0, 10)


@pytest.mark.parametrize(("p", "slope", "expected"), [
    (8.0, 3e-7, 7.0),  # the loss grows with p: p goes down, by the step whatever the scale
    (8.0, -5e3, 9.0),  # ... and up when it falls with p
    (8.0, 0.0, 8.0),  # no signal: p stays
    (1.5, 1.0, 1.0),  # kept in [p_min, p_max]
    (14.5, -1.0, 15.0),
])
def test_a_tracked_degree_steps_against_the_sign_of_its_slope(p, slope, expected):
    assert tracked_degree_step(p, slope, 1.0, 1.0, 15.0) == expected


def test_the_degree_grid_is_even_in_log_p_from_p_min_to_p_max():
    grid = degree_grid(1.0, 15.0)
    assert len(grid) == 9 and grid[0] == 1.0 and grid[-1] == pytest.approx(15.0)
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert ratios == pytest.approx([15.0 ** (1 / 8)] * 8)
    assert degree_grid(3.0, 3.0) == (3.0,)


def models_and_weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(5, 200, generator=gen, dtype=torch.float64),
            torch.tensor([0.4, 0.15, 0.15, 0.15, 0.15], dtype=torch.float64))


def float64_power_mean(x: torch.Tensor, weights: torch.Tensor, p: float) -> torch.Tensor:
    return inverse_sign_power(weights @ sign_power(x, p), p)


def test_the_descent_degree_minimises_the_quadratic_model_of_the_loss_change():
    # <g, d_p> + |d_p|^2 / (2 eta) over the grid, with d_p the departure from the linear mean
    # (float64 reference), and step = -eta g
    x, weights = models_and_weights()
    linear = weights @ x
    grid = degree_grid(1.0, 15.0)
    eta = 0.3
    for target_p in (2.76, 7.62):
        gradient = -(float64_power_mean(x, weights, target_p) - linear) / eta
        model = {p: float(gradient @ (d := float64_power_mean(x, weights, p) - linear)
                          + d @ d / (2 * eta)) for p in grid}
        chosen = descent_degree(x, weights, -eta * gradient, grid)
        assert chosen == min(model, key=model.__getitem__)
        assert chosen == pytest.approx(target_p, rel=0.01)  # the step was that merge's


def test_the_descent_degree_stays_linear_unless_a_larger_degree_is_predicted_to_help():
    x, weights = models_and_weights(1)
    grid = degree_grid(1.0, 15.0)
    assert descent_degree(x, weights, torch.zeros(200, dtype=torch.float64), grid) == 1.0
    outwards = float64_power_mean(x, weights, 15.0) - weights @ x  # where large p goes
    assert descent_degree(x, weights, -outwards, grid) == 1.0  # predicted to raise the loss
    assert descent_degree(x, weights, 1e-6 * outwards, grid) == 1.0  # too little to gain
    assert descent_degree(x, weights, outwards, grid) == pytest.approx(15.0)


def test_a_bounded_step_keeps_its_direction_and_is_no_longer_than_the_reference():
    gen = torch.Generator().manual_seed(2)
    step = torch.randn(50, generator=gen, dtype=torch.float64)
    reference = 0.1 * torch.randn(50, generator=gen, dtype=torch.float64)
    short = bounded_step(step, reference)
    assert torch.linalg.vector_norm(short) == pytest.approx(
        float(torch.linalg.vector_norm(reference)))
    assert torch.allclose(short / torch.linalg.vector_norm(short),
                          step / torch.linalg.vector_norm(step))
    assert torch.equal(bounded_step(reference, step), reference)  # already short enough
    assert not bounded_step(step, torch.zeros(50, dtype=torch.float64)).any()
