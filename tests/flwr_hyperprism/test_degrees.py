"""Degree schedules (p-mode schedule) and the tracked degree's step (p-mode tracking)."""

from __future__ import annotations

import math

import pytest

from flwr_hyperprism.degrees import P_SCHEDULES, scheduled_degree, tracked_degree_step


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
