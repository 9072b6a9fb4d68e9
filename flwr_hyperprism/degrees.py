"""Power degrees on a schedule: the ablation of a learned degree.

Large p makes the merge follow, per coordinate, the model of largest magnitude: it spreads what
some nodes have learnt and others have not (label skew) fast, and biases the merge outwards
once the models agree. A decay from ``p_max`` to ``p_min`` gets both (measured in RESULTS.md).
"""

from __future__ import annotations

import math

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
