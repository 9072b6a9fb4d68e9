"""Stacked forward passes equal each model's own forward pass."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from flwr_hyperprism.math.models import build_model
from flwr_hyperprism.math.stacked import stack, stacked_forward


@pytest.mark.parametrize(("name", "shape"), [("logreg", (1, 28, 28)), ("lenet", (1, 28, 28)),
                                             ("cnn", (3, 32, 32))])
@pytest.mark.parametrize("shared_input", [True, False])
def test_stacked_outputs_are_each_models_outputs(name, shape, shared_input):
    model = build_model(name, shape, 10, seed=0)
    gen = torch.Generator().manual_seed(1)
    models = [{k: v.detach() + 0.1 * torch.randn(v.shape, generator=gen)
               for k, v in model.named_parameters()} for _ in range(3)]
    x = torch.randn((5, *shape) if shared_input else (3, 5, *shape), generator=gen)
    stacked = stacked_forward(model, stack(models, list(models[0])), x, shared_input)
    assert stacked.shape == (3, 5, 10)
    for i, params in enumerate(models):
        expected = functional_call(model, params, (x if shared_input else x[i],))
        torch.testing.assert_close(stacked[i], expected, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_each_models_own_parameters():
    model = build_model("logreg", (1, 4, 4), 3, seed=0)
    params = {k: torch.randn(2, *v.shape, requires_grad=True)
              for k, v in model.named_parameters()}
    x = torch.randn(2, 6, 1, 4, 4)
    stacked_forward(model, params, x, shared_input=False)[0].sum().backward()
    for value in params.values():
        assert value.grad is not None and value.grad[1].abs().sum() == 0
        assert value.grad[0].abs().sum() > 0
