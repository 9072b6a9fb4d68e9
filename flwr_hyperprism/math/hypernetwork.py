"""The per-node hypernetwork that chooses HyperPrism's power degrees (p_theta, p_phi)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .models import DECISION, REPRESENTATION

P_SELECT_MODES = ("soft", "st")
HN_INPUTS = ("gradient", "embedding")
SUMMARY_STATS = 3  # mean, std, L2 norm per parameter tensor
_P_INIT_SHARPNESS = 2.0  # logit drop per unit of distance from p_init (p_init=1: p ~ 1.04)


def parse_candidates(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of candidate degrees, e.g. ``"1,3,5"``; each must be >= 1."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ValueError(f"p-candidates must be comma-separated numbers, got {text!r}") from err
    if not values or min(values) < 1.0:
        raise ValueError(f"p-candidates must be a non-empty list of degrees >= 1, got {text!r}")
    return values


def gradient_summary(grads: Iterable[Tensor]) -> Tensor:
    """Per-tensor [mean, std, L2 norm] of a gradient, concatenated: shape (3 * num_tensors,)."""
    stats = [torch.stack([g.mean(), g.std(unbiased=False), g.norm()]) for g in grads]
    return torch.cat(stats).detach().float()


class HyperNetwork(nn.Module):
    """Embedding v_i and a gradient summary in; p_theta and p_phi out.

    A trunk of three fully connected layers (``hidden`` units, ReLU) feeds two heads, each a
    linear layer and a softmax over the candidate degrees C. The degree is the expectation
    sum_k pi_k C_k (``soft``) or C[argmax pi] with the expectation's gradient (``st``,
    straight-through). Either way p lies in [min C, max C]. By default the heads start near
    uniform (p about the candidates' mean); ``p_init`` starts them near that degree instead.
    """

    candidates: Tensor  # (C,) the candidate degrees (a buffer)

    def __init__(self, summary_dim: int, candidates: Sequence[float], embedding_dim: int = 32,
                 hidden: int = 64, select: str = "soft", p_init: float | None = None) -> None:
        super().__init__()
        if select not in P_SELECT_MODES:
            raise ValueError(f"unknown p-select {select!r}; valid: {', '.join(P_SELECT_MODES)}")
        self.select = select
        self.summary_dim = summary_dim
        self.embedding = nn.Parameter(torch.randn(embedding_dim))  # v_i
        self.trunk = nn.Sequential(
            nn.Linear(embedding_dim + summary_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({group: nn.Linear(hidden, len(candidates))
                                    for group in (REPRESENTATION, DECISION)})
        self.register_buffer("candidates", torch.tensor(candidates, dtype=torch.float32),
                             persistent=False)
        if p_init is not None:  # head biases that put the softmax mass next to p_init
            if not min(candidates) <= p_init <= max(candidates):
                raise ValueError(f"hn-p-init={p_init} must lie within the candidate degrees "
                                 f"[{min(candidates)}, {max(candidates)}] (or be 0: uniform)")
            bias = -_P_INIT_SHARPNESS * (self.candidates - p_init).abs()
            with torch.no_grad():
                for head in self.heads.values():
                    cast(nn.Linear, head).bias.copy_(bias)

    def forward(self, summary: Tensor) -> dict[str, Tensor]:
        """Degrees for each layer group: {"theta": p_theta, "phi": p_phi}, 0-d tensors.

        Parameters
        ----------
        summary : (summary_dim,) gradient summary; ignored when summary_dim is 0
        """
        inputs = self.embedding if self.summary_dim == 0 else torch.cat([self.embedding, summary])
        hidden = self.trunk(inputs)
        degrees = {}
        for group, head in self.heads.items():
            probs = torch.softmax(head(hidden), dim=-1)
            p = probs @ self.candidates
            if self.select == "st":
                p = p + (self.candidates[probs.argmax()] - p).detach()
            degrees[group] = p
        return degrees
