"""Power degrees on a schedule: the ablation of a learned degree.

Large p makes the merge follow, per coordinate, the model of largest magnitude: it spreads what
some nodes have learnt and others have not (label skew) fast, and biases the merge outwards
once the models agree. A decay from ``p_max`` to ``p_min`` gets both (measured in RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .mirror import power_mean, power_means

P_SCHEDULES = ("step", "linear", "cosine", "exponential")


def scheduled_degree(kind: str, round_: int, p_max: float, p_min: float,
                     horizon: int) -> float:
    """The degree of round ``round_`` (1-based: the merge of round-trip ``round_``).

    step: ``p_max`` for rounds 1..horizon, then ``p_min``; linear and cosine: from ``p_max``
    at round 1 to ``p_min`` at round horizon + 1, then ``p_min``; exponential:
    p_min + (p_max - p_min) exp(-(round - 1) / horizon).
    """
    if kind not in P_SCHEDULES:
        raise ValueError(f"unknown p-schedule {kind!r}; valid: {', '.join(P_SCHEDULES)}")
    if round_ < 1 or horizon < 1:
        raise ValueError(f"round ({round_}) and horizon ({horizon}) must be >= 1")
    progress = min(round_ - 1, horizon) / horizon  # 0 at round 1, 1 from round horizon + 1
    if kind == "step":
        return p_max if round_ <= horizon else p_min
    if kind == "linear":
        return p_max + (p_min - p_max) * progress
    if kind == "cosine":
        return p_min + (p_max - p_min) * (1.0 + math.cos(math.pi * progress)) / 2.0
    return p_min + (p_max - p_min) * math.exp(-(round_ - 1) / horizon)


def tracked_degree_step(p: float, slope: float, step: float, p_min: float, p_max: float
                        ) -> float:
    """One step of a learned degree: ``step`` against the sign of d loss / d p (``slope``),
    kept in [p_min, p_max]. The sign alone moves p, so the gradient's scale (about 1e-4 for
    the hypernetwork's loss) does not matter; a zero slope leaves p where it is."""
    direction = (slope > 0) - (slope < 0)
    return min(p_max, max(p_min, p - step * direction))


def degree_grid(p_min: float, p_max: float, size: int = 9) -> tuple[float, ...]:
    """``size`` degrees from ``p_min`` to ``p_max``, evenly spaced in log p (a step from 1 to
    1.4 changes the merge about as much as one from 10.7 to 15)."""
    if size < 2 or p_max <= p_min:
        return (p_min,)
    ratio = p_max / p_min
    return tuple(p_min * ratio ** (k / (size - 1)) for k in range(size))


def bounded_step(step: Tensor, reference: Tensor) -> Tensor:
    """``step`` shortened, if need be, to the Euclidean length of ``reference``.

    Parameters
    ----------
    step : (n,) a target departure from the linear mean
    reference : (n,) a vector whose length bounds it (only its norm is used)

    Returns
    -------
    (n,) ``step`` scaled by min(1, ||reference|| / ||step||); zeros when ``reference`` is zero.
    """
    length, limit = torch.linalg.vector_norm(step), torch.linalg.vector_norm(reference)
    if length <= limit:
        return step
    shortened: Tensor = step * (limit / length)
    return shortened


def descent_degree(stacked: Tensor, weights: Tensor, step: Tensor, grid: Sequence[float]
                   ) -> float:
    """The degree of ``grid`` whose power mean lands nearest the linear mean plus ``step``.

    With d_p = WPM_p(x; a) - WPM_1(x; a), the merge's departure from plain averaging, and
    ``step`` = -eta g for a gradient estimate g and step size eta, the quadratic model of the
    loss change <g, d_p> + ||d_p||^2 / (2 eta) equals (||d_p - step||^2 - ||step||^2) / (2 eta):
    the degree that minimises the model is the one nearest the step. p = 1 (d = 0) is chosen
    unless a larger degree is predicted to lower the loss, and then only as far as a gradient
    step of size eta would go.

    Parameters
    ----------
    stacked : (k, n) the k models' parameters (own first)
    weights : (k,) mixing weights summing to 1
    step : (n,) the target departure from the linear mean, -eta g
    grid : candidate degrees, ascending (ties go to the smaller)

    Returns
    -------
    The chosen degree (an element of ``grid``).
    """
    linear = power_mean(stacked, weights, 1.0)
    target = linear + step
    means = power_means(stacked, weights, grid)
    distances = [float(torch.linalg.vector_norm(mean - target)) for mean in means]
    return grid[min(range(len(grid)), key=distances.__getitem__)]
