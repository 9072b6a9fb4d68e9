"""Many models of one architecture computed as one: forward passes over stacked parameters.

A node group (the partitions one process hosts) evaluates and trains its nodes' models
together. Their parameters are stacked along a new leading axis (``stack``) and
``stacked_forward`` runs the architecture's layers once for all n models: a linear layer or a
convolution on an input the models share (evaluation: one test batch for all) is a single
wide product with the n weight matrices side by side; on per-model inputs (training: each
node its own minibatch) a batched matrix product or a grouped convolution. On the CPU, whose
kernels run a grouped convolution slower than its groups one by one, a model with
convolutions runs model by model. Parameter-free
layers (ReLU, pooling, flatten) run on all models' activations at once; any other layer with
parameters falls back to ``torch.func.vmap``. Pure torch: no Flower, no node logic.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .merge import StateDict


def stack(models: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> StateDict:
    """{name: (n, *shape)}: the tensors ``names`` of n models stacked along a new axis 0."""
    return {name: torch.stack([model[name] for model in models]) for name in names}


def stacked_forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor,
                    shared_input: bool) -> Tensor:
    """The outputs of n models of ``model``'s architecture with stacked ``params``.

    ``model`` must apply its leaf modules in registration order (every model of
    ``flwr_hyperprism.math.models``: ``features``, then ``classifier``); its own parameter
    values are not used.

    Parameters
    ----------
    model : the architecture
    params : {parameter name: (n, *shape)}, every parameter of ``model``
    x : (b, *input_shape) shared by all n models when ``shared_input``, else
        (n, b, *input_shape), one batch per model
    shared_input : whether ``x`` is one batch for all models

    Returns
    -------
    (n, b, *output_shape)
    """
    n = next(iter(params.values())).shape[0]
    if x.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # CPU kernels run a grouped convolution slower than its groups one by one
        return torch.stack([functional_call(model, {k: v[i] for k, v in params.items()},
                                            (x if shared_input else x[i],))
                            for i in range(n)])
    h, shared = x, shared_input
    for prefix, layer in _leaves(model):
        own = {name[len(prefix) + 1:]: value for name, value in params.items()
               if name.startswith(prefix + ".")}
        h, shared = _apply(layer, own, h, shared, n)
    return h.expand(n, *h.shape) if shared else h


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            yield name, module


def _apply(layer: nn.Module, params: StateDict, h: Tensor, shared: bool, n: int
           ) -> tuple[Tensor, bool]:
    """One layer on activations h: (b, ...) when ``shared``, else (n, b, ...)."""
    if not params:  # parameter-free and per-sample: all models' activations at once
        if shared:
            return layer(h), True
        out = layer(h.reshape(-1, *h.shape[2:]))
        return out.reshape(n, h.shape[1], *out.shape[1:]), False
    if isinstance(layer, nn.Linear):
        return _linear(params["weight"], params.get("bias"), h, shared), False
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros":
        return _conv2d(layer, params["weight"], params.get("bias"), h, shared), False
    per_model = vmap(lambda p, a: functional_call(layer, p, (a,)),
                     in_dims=(0, None if shared else 0))
    return per_model(params, h), False


def _linear(weight: Tensor, bias: Tensor | None, h: Tensor, shared: bool) -> Tensor:
    # weight (n, out, in), bias (n, out); h (b, in) shared or (n, b, in)
    n, out, _ = weight.shape
    if shared:
        y = (h @ weight.reshape(n * out, -1).T).reshape(h.shape[0], n, out).transpose(0, 1)
        return y + bias.unsqueeze(1) if bias is not None else y
    if bias is None:
        return torch.bmm(h, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _conv2d(layer: nn.Conv2d, weight: Tensor, bias: Tensor | None, h: Tensor, shared: bool
            ) -> Tensor:
    # weight (n, out, in / groups, kh, kw); h (b, C, H, W) shared or (n, b, C, H, W)
    n, out = weight.shape[:2]
    flat_bias = bias.reshape(-1) if bias is not None else None
    if shared:
        y = F.conv2d(h, weight.reshape(n * out, *weight.shape[2:]), flat_bias, layer.stride,
                     layer.padding, layer.dilation, layer.groups)
    else:
        batch = h.shape[1]
        wide = h.transpose(0, 1).reshape(batch, n * h.shape[2], *h.shape[3:])
        y = F.conv2d(wide, weight.reshape(n * out, *weight.shape[2:]), flat_bias, layer.stride,
                     layer.padding, layer.dilation, n * layer.groups)
    return y.reshape(y.shape[0], n, out, *y.shape[2:]).transpose(0, 1)
