"""Degree schedules (p-mode schedule)."""

from __future__ import annotations

import math

import pytest

from flwr_hyperprism.degrees import P_SCHEDULES, scheduled_degree


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
