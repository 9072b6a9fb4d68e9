"""The shared round machinery: node data, tasks on the wire."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.config import RunConfig
from strategies import NodeTask
from strategies.learner import evaluation_split, node_data
from strategies.protocol import record_task, task_record
from strategies.screening import screen_neighbours


def test_eval_size_gives_every_node_one_shared_fixed_test_subset():
    config = RunConfig(num_nodes=4, eval_size=300)
    subsets = [node_data(config, pid).test for pid in range(4)]
    assert len(subsets[0]) == 300 and all(s is subsets[0] for s in subsets)  # one per process
    evaluation_split.cache_clear()
    again = node_data(config, 0).test  # another process: the same subset, drawn again
    assert again is not subsets[0]
    assert torch.equal(again.x, subsets[0].x) and torch.equal(again.y, subsets[0].y)
    full = node_data(config.replace(eval_size=0), 0).test
    assert len(full) > 300


def test_a_validation_fraction_is_held_out_of_the_partitions_and_evaluated_on():
    config = RunConfig(num_nodes=4, validation_fraction=0.1)
    data = [node_data(config, pid) for pid in range(4)]
    full = node_data(config.replace(validation_fraction=0.0), 0).test  # the test set
    validation = data[0].test
    assert all(d.test is validation for d in data) and len(validation) == 3000  # of 30,000
    assert not torch.equal(validation.x[:10], full.x[:10])
    trained_on = torch.cat([d.train.x for d in data])
    assert len(trained_on) == 27_000  # every other training sample, once
    # no validation sample is in a partition (rows compared by their pixel sums and first
    # pixels, which are distinct for this continuous data)
    keys = {(float(x.sum()), float(x.flatten()[0])) for x in trained_on}
    assert not any((float(x.sum()), float(x.flatten()[0])) in keys for x in validation.x)


def test_node_data_rejects_partition_ids_outside_the_federation():
    with pytest.raises(ValueError, match="partition id 4 is outside 0..3"):
        node_data(RunConfig(num_nodes=4), 4)


def test_node_task_survives_the_config_record_round_trip():
    task = NodeTask(7, (1, 4), (0.25, 0.2), 0.55, train=False, coefficients={"chi": 2.5})
    assert record_task(task_record(task)) == task


def test_leaving_out_neighbours_keeps_the_row_sum():
    laplacian_row = NodeTask(1, (2, 5, 7), (-0.25, -0.25, -0.25), 0.75)
    assert laplacian_row.without([5]) == NodeTask(1, (2, 7), (-0.25, -0.25), 0.5)


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
