"""Minibatch SGD with heavy-ball momentum: the update of ``torch.optim.SGD(params, lr,
momentum)`` (no dampening, weight decay or Nesterov), operation for operation, so trajectories
are the same bit for bit.

It exists because the first ``torch.optim.Optimizer`` built in a process imports
``torch._dynamo``: about 2 s of CPU, paid again by every fresh process, and a deployed Flower
SuperNode starts a fresh ``flwr-clientapp`` process for every message (measured: 4.3 s of CPU
per round-trip of a small model with ``torch.optim``, 2.3 s with this).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .merge import StateDict

BUFFER = "momentum_buffer"  # the key's suffix, as in torch.optim.SGD's state_dict


class MomentumSGD:
    """``p <- p - lr * b`` with ``b <- momentum * b + grad`` (``b = grad`` at the first step,
    ``b = grad`` always when ``momentum`` is 0) for each parameter that has a gradient.

    Parameters
    ----------
    parameters : the tensors to update in place (any shapes), in a fixed order: the state's
        keys are their indices.
    lr : step size, > 0.
    momentum : momentum factor in [0, 1).
    """

    def __init__(self, parameters: Iterable[torch.Tensor], lr: float,
                 momentum: float = 0.0) -> None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be finite and > 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.parameters = list(parameters)
        self.lr, self.momentum = lr, momentum
        self.buffers: dict[int, torch.Tensor] = {}

    def zero_grad(self) -> None:
        """Drop the parameters' gradients (``set_to_none``, as torch.optim does by default)."""
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for index, parameter in enumerate(self.parameters):
            if parameter.grad is None:
                continue
            direction = parameter.grad
            if self.momentum != 0:
                buffer = self.buffers.get(index)
                if buffer is None:
                    buffer = self.buffers[index] = direction.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(direction)
                direction = buffer
            parameter.add_(direction, alpha=-self.lr)

    def state(self) -> StateDict:
        """The momentum buffers, ``"<parameter index>.momentum_buffer"`` -> a copy (none before
        the first step or without momentum)."""
        return {f"{index}.{BUFFER}": buffer.clone() for index, buffer in self.buffers.items()}

    def load_state(self, tensors: StateDict) -> None:
        """Set the buffers from ``state()``'s output (an empty dict resets them); ValueError
        for a key or a shape that does not fit these parameters."""
        buffers = {}
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            if name != BUFFER or not index.isdigit() or int(index) >= len(self.parameters):
                raise ValueError(f"optimizer state key {key!r} is not '<index>.{BUFFER}' for "
                                 f"one of the {len(self.parameters)} parameters")
            parameter = self.parameters[int(index)]
            if value.shape != parameter.shape:
                raise ValueError(f"optimizer state {key!r} has shape {tuple(value.shape)}, its "
                                 f"parameter {tuple(parameter.shape)}")
            buffers[int(index)] = value.detach().clone().to(parameter.device, parameter.dtype)
        self.buffers = buffers
