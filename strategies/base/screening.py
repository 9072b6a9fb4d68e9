"""Which neighbours' models a node may merge: well-formed, finite and of a plausible scale.

Corrupt or non-finite models from a neighbour must never poison a node; every node rule
screens its neighbours with ``screen_neighbours`` before it merges (pure torch, no Flower).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping

from torch import Tensor

from .rule import NodeTask, StateDict


def screen_neighbours(own: StateDict, task: NodeTask, neighbour_models: Mapping[int, StateDict],
                      max_ratio: float) -> tuple[NodeTask, dict[int, str]]:
    """Drop neighbours whose model cannot be merged with ``own``, with the reason for each.

    A neighbour is dropped when its model is missing, lacks a tensor of ``own`` or has extra
    ones, has a tensor with another shape or dtype, or any NaN/Inf (``model_fault``), or when
    its largest floating-point magnitude exceeds ``max_ratio`` times a reference scale: the
    larger of the node's own largest magnitude and the lower median of the largest magnitudes
    of the node and its well-formed neighbours. The median keeps the check meaningful when the
    node's own model is all zeros (the start of logistic regression) or smaller than its
    neighbours', and a minority of outliers cannot move it. Each dropped neighbour's weight goes
    to the node itself (``NodeTask.without``). Returns the task to use and {partition: reason}.
    """
    faults = {j: model_fault(own, neighbour_models.get(j)) for j in task.neighbours}
    sizes = {j: largest_magnitude(neighbour_models[j]) for j, fault in faults.items()
             if fault is None}
    own_size = largest_magnitude(own)
    everyone = sorted([own_size, *sizes.values()])
    limit = max_ratio * max(own_size, everyone[(len(everyone) - 1) // 2])
    faults.update({j: f"|value| {size:.4g} > {limit:.4g}" for j, size in sizes.items()
                   if size > limit})
    dropped = {j: reason for j, reason in faults.items() if reason}
    return (task.without(dropped) if dropped else task), dropped


def model_fault(own: StateDict, model: StateDict | None) -> str | None:
    """Why ``model`` cannot be merged with ``own`` at all (None if it can)."""
    if model is None:
        return "no model"
    if model.keys() != own.keys():
        missing, extra = sorted(own.keys() - model.keys()), sorted(model.keys() - own.keys())
        return f"tensors differ (missing {missing}, extra {extra})"
    for key, mine in own.items():
        theirs = model[key]
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            return (f"{key!r} is {theirs.dtype} {tuple(theirs.shape)}, expected {mine.dtype} "
                    f"{tuple(mine.shape)}")
    return nonfinite_fault(model)


def nonfinite_fault(model: StateDict) -> str | None:
    """The first tensor of ``model`` holding NaN or Inf, as a reason (None if all are finite)."""
    for key, value in model.items():
        if value.is_floating_point() and not math.isfinite(_largest(value)):
            return f"{key!r} has NaN or Inf"
    return None


def divergence_fault(start: StateDict, model: StateDict, metrics: Mapping[str, float],
                     max_ratio: float) -> str | None:
    """Why a node's own new ``model`` (trained or merged from ``start``) has diverged, or None.

    It has when a tensor or a metric is NaN or Inf, or when its largest magnitude exceeds
    ``max_ratio`` times ``start``'s (a non-zero one): the bound its neighbours would drop it
    by (``screen_neighbours``), so a node holds itself to the standard it holds them to.
    """
    fault = nonfinite_fault(model)
    if fault is not None:
        return fault
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        return f"metrics {bad} are NaN or Inf"
    reference, size = largest_magnitude(start), largest_magnitude(model)
    if reference > 0 and size > max_ratio * reference:
        return f"|value| {size:.4g} > {max_ratio:g} x {reference:.4g} before"
    return None


def largest_magnitude(model: StateDict) -> float:
    """max |value| over the floating-point tensors of ``model`` (0 if it has none; meaningful
    for finite models: ``nonfinite_fault`` first)."""
    return max((_largest(v) for v in model.values() if v.is_floating_point() and v.numel()),
               default=0.0)


# A routed model is screened by each node of a group that hears it: its tensors' largest
# magnitudes are computed once, valid while the tensor is not changed in place (its version).
_LARGEST: dict[int, tuple[int, float]] = {}  # id(tensor) -> (its version, max |value|)


def _largest(value: Tensor) -> float:
    """max |value| of a floating-point tensor (NaN if it holds one: max propagates NaN)."""
    if not value.numel():
        return 0.0
    key = id(value)
    cached = _LARGEST.get(key)
    if cached is not None and cached[0] == value._version:
        return cached[1]
    if cached is None:
        weakref.finalize(value, _LARGEST.pop, key, None)
    largest = float(value.abs().max())
    _LARGEST[key] = (value._version, largest)
    return largest
