"""Merging models: a weighted power mean per layer group, over flattened parameter groups."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .mirror import power_mean

StateDict = dict[str, Tensor]
"""Named tensors: a model's state dict, or any named group of a node's state."""


def merge_models(models: list[StateDict], weights: Tensor,
                 degrees: Mapping[str, Tensor] | Mapping[str, float],
                 groups: Mapping[str, list[str]]) -> StateDict:
    """Weighted power mean of k models, per layer group with that group's degree.

    Parameters
    ----------
    models : k state dicts with identical keys and shapes (own model first)
    weights : (k,) mixing weights summing to 1
    degrees : {group: p} with p >= 1 (floats, or 0-d tensors that gradients flow to)
    groups : {group: parameter names}

    Returns
    -------
    The merged parameters (one power mean over each group's concatenated parameters).
    """
    merged: StateDict = {}
    for group, names in groups.items():
        if not names:
            continue
        flat = power_mean(stack_group(models, names), weights, degrees[group])
        merged.update(unflatten(flat, models[0], names))
    return merged


def stack_group(models: list[StateDict], names: list[str]) -> Tensor:
    """(k, n): row j is model j's tensors ``names``, flattened and concatenated."""
    sizes = [models[0][n].numel() for n in names]
    stacked = models[0][names[0]].new_empty(len(models), sum(sizes))
    for row, model in zip(stacked, models):  # one copy of each model, no temporaries
        torch.cat([model[n].reshape(-1) for n in names], out=row)
    return stacked


def unflatten(flat: Tensor, like: Mapping[str, Tensor], names: list[str]) -> StateDict:
    """Inverse of one row of ``stack_group``: views of ``flat`` shaped as ``like[name]``."""
    chunks = flat.split([like[n].numel() for n in names])
    return {name: chunk.view_as(like[name]) for name, chunk in zip(names, chunks)}
