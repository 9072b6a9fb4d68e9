"""Screening neighbours' models: what is unusable is dropped and its weight stays home."""

from __future__ import annotations

import pytest
import torch

from strategies import NodeTask
from strategies.base.screening import screen_neighbours


def test_screen_neighbours_drops_unmergeable_models_and_keeps_their_weight_at_home():
    own = {"w": torch.full((2, 3), 0.5), "b": torch.zeros(3), "n": torch.tensor(10**9)}
    good = {"w": torch.ones(2, 3), "b": torch.full((3,), -1.0), "n": torch.tensor(10**12)}
    bad = {
        1: {"w": torch.full((2, 3), float("nan")), "b": torch.ones(3), "n": own["n"]},
        2: {"w": torch.ones(3, 2), "b": torch.ones(3), "n": own["n"]},
        3: {"w": torch.ones(2, 3), "n": own["n"]},
        4: {"w": torch.ones(2, 3), "b": torch.ones(3), "n": own["n"], "extra": torch.ones(1)},
        5: {"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(3), "n": own["n"]},
        6: {"w": torch.ones(2, 3), "b": torch.tensor([1.0, float("inf"), 0.0]), "n": own["n"]},
        7: {"w": torch.ones(2, 3), "b": torch.tensor([0.0, -1e30, 0.0]), "n": own["n"]},
        8: {"w": torch.full((2, 3), 1001.0), "b": torch.ones(3), "n": own["n"]},
    }
    task = NodeTask(3, (0, *bad, 9), (0.1,) * 10, 0.0)
    screened, dropped = screen_neighbours(own, task, {0: good, **bad}, max_ratio=1000.0)
    assert list(dropped) == [*bad, 9] and screened.neighbours == (0,)
    assert screened.weights == (0.1,)
    assert screened.self_weight == pytest.approx(0.9)
    assert "'w' has NaN or Inf" in dropped[1] and "'b' has NaN or Inf" in dropped[6]
    assert "expected torch.float32 (2, 3)" in dropped[2] and "float64" in dropped[5]
    assert "missing ['b']" in dropped[3] and "extra ['extra']" in dropped[4]
    # scale: lower median of (0.5, 1, 1001, 1e30) = 1, over floating-point tensors only
    assert "1e+30 > 1000" in dropped[7] and "1001 > 1000" in dropped[8]
    assert dropped[9] == "no model"
    assert screen_neighbours(own, NodeTask(3, (0,), (0.5,), 0.5), {0: good}, 1000.0) == (
        NodeTask(3, (0,), (0.5,), 0.5), {})
    big_own = {**own, "w": torch.full((2, 3), 2.0)}  # the node's own scale counts in full
    assert screen_neighbours(big_own, NodeTask(3, (8,), (0.5,), 0.5), bad, 1000.0)[1] == {}


def test_the_magnitude_scale_comes_from_the_median_when_the_own_model_is_small_or_zero():
    zero = {"w": torch.zeros(4)}
    task = NodeTask(0, (1, 2, 3), (0.25,) * 3, 0.25)
    # everyone else at zero (the first round of logistic regression): a lone 1e30 is dropped
    models = {1: {"w": torch.full((4,), 1e30)}, 2: dict(zero), 3: dict(zero)}
    assert list(screen_neighbours(zero, task, models, 1000.0)[1]) == [1]
    # a node far smaller than its honest neighbours keeps them and drops only the outlier
    tiny = {"w": torch.full((4,), 1e-3)}
    models = {1: {"w": torch.ones(4)}, 2: {"w": -torch.ones(4)}, 3: {"w": torch.full((4,), 2e3)}}
    assert list(screen_neighbours(tiny, task, models, 1000.0)[1]) == [3]
    # with a single neighbour the lower median is the node's own scale
    lone = NodeTask(0, (1,), (0.5,), 0.5)
    assert list(screen_neighbours(zero, lone, {1: {"w": torch.ones(4)}}, 1000.0)[1]) == [1]
