"""Models and their split into representation (theta) and decision (phi) layers."""

from __future__ import annotations

import pytest
import torch

from flwr_hyperprism.math.models import (
    DECISION,
    REPRESENTATION,
    MaxPool2x2,
    build_model,
    layer_group,
)


@pytest.mark.parametrize("name, shape", [("logreg", (1, 28, 28)), ("cnn", (1, 28, 28)),
                                         ("cnn", (3, 32, 32)), ("lenet", (1, 28, 28)),
                                         ("lenet", (3, 32, 32))])
def test_models_map_images_to_ten_logits_and_are_seeded(name, shape):
    model = build_model(name, shape, 10, seed=3)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
    again = build_model(name, shape, 10, seed=3).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    other = build_model(name, shape, 10, seed=4).state_dict()
    if name != "logreg":
        assert not all(torch.equal(v, other[k]) for k, v in model.state_dict().items())
    else:  # logistic regression starts from zeros whatever the seed
        assert all(not v.any() for v in [*model.state_dict().values(), *other.values()])


def test_layer_groups_split_conv_from_fully_connected_layers():
    cnn_groups = {n: layer_group(n) for n, _ in build_model("cnn", (3, 32, 32), 10, 0)
                  .named_parameters()}
    assert {n for n, g in cnn_groups.items() if g == REPRESENTATION} == {
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"}
    assert {n for n, g in cnn_groups.items() if g == DECISION} == {
        "classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"}
    lenet = build_model("lenet", (1, 28, 28), 10, 0)
    assert [layer_group(n) for n, _ in lenet.named_parameters()] == [REPRESENTATION] * 4 + [
        DECISION] * 6  # two conv layers, three fully connected
    assert sum(p.numel() for p in lenet.parameters()) == 61706  # LeNet-5 on 32x32 (padded)
    logreg = build_model("logreg", (1, 28, 28), 10, 0)
    assert {layer_group(n) for n, _ in logreg.named_parameters()} == {DECISION}


def test_bad_model_requests_raise():
    with pytest.raises(ValueError, match="unknown model 'mlp'; valid: logreg, cnn, lenet"):
        build_model("mlp", (1, 28, 28), 10, 0)
    with pytest.raises(ValueError, match="needs \\(C, H, W\\) images"):
        build_model("cnn", (784,), 10, 0)


@pytest.mark.parametrize("shape", [(3, 6, 28, 28), (2, 4, 9, 7), (5, 1, 2, 2)])
def test_max_pool_without_autograd_gives_torchs_values_nan_and_odd_edges_included(shape):
    x = torch.randn(shape, dtype=torch.float64)
    x[0, 0, 0, 1] = float("nan")
    x[1:, :, :2, :2] = 0.25  # a tied window
    pool, reference = MaxPool2x2(), torch.nn.MaxPool2d(2)
    with torch.no_grad():
        fast = pool(x)
    assert fast.shape == reference(x).shape
    assert torch.equal(fast.nan_to_num(7.0), reference(x).nan_to_num(7.0))
    assert fast[0, 0, 0, 0].isnan()
    # with autograd: torch's max-pool, whose gradient goes to one element of a tied window
    leaf = x.nan_to_num(0.0).requires_grad_()
    pool(leaf).sum().backward()
    assert leaf.grad is not None and leaf.grad[1, 0, :2, :2].sum() == 1.0
