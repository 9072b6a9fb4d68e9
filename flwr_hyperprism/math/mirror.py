"""Mirror maps and the weighted power mean (a Kolmogorov mean) used by HyperPrism.

The mirror map is the sign-preserving power ``s_p(u) = sign(u) * |u|**p`` with inverse
``s_p^{-1}(v) = sign(v) * |v|**(1/p)``; for odd integer ``p`` it is the literal ``u**p``.
The weighted power mean of k tensors is ``WPM_p(x; a) = s_p^{-1}(sum_j a_j s_p(x_j))``.

``power_mean`` evaluates it in the scaled form ``S * WPM_p(x / S; a)`` with ``S`` the
per-coordinate maximum of ``|x_j|`` (exact, because the mean is positively homogeneous), so
every powered value lies in [-1, 1]: nothing overflows for any ``p``, and underflow only hits
terms that are negligible next to the largest one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_WEIGHT_SUM_TOLERANCE = 1e-5
# The p-th root amplifies the rounding error of a mirror-space sum that nearly cancels by
# sum_j a_j |m_j| / |s|; below this ratio the coordinate is recomputed in float64, which keeps
# the float32 result within ~eps * S for every p.
_REFINE_BELOW = 0.1
_BLOCK_COLUMNS = 1 << 17


def sign_power(u: Tensor, p: float | Tensor) -> Tensor:
    """Mirror map ``sign(u) * |u|**p`` (elementwise, any shape); requires ``p >= 1``."""
    return torch.copysign(u.abs().pow(p), u)


def inverse_sign_power(v: Tensor, p: float | Tensor) -> Tensor:
    """Inverse mirror map ``sign(v) * |v|**(1/p)`` (elementwise, any shape)."""
    return torch.copysign(v.abs().pow(1.0 / p), v)


def mirror_step(w: Tensor, step: Tensor, p: float) -> Tensor:
    """A step taken in mirror space: ``s_p^{-1}(s_p(w) + step)``, elementwise (p >= 1).

    Both terms are divided by S = max(|w|, |s_p^{-1}(step)|) before powering, so nothing
    overflows. With ``p == 1`` it is exactly ``w + step``.
    """
    if p == 1.0:
        return w + step
    root = inverse_sign_power(step, p)
    scale = torch.maximum(w.abs(), root.abs())
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    mirrored = sign_power(w / scale, p) + sign_power(root / scale, p)
    return scale * inverse_sign_power(mirrored, p)


def power_mean(x: Tensor, weights: Tensor, p: float | Tensor) -> Tensor:
    """Weighted power mean ``s_p^{-1}(sum_j a_j s_p(x_j))`` over the first axis.

    Parameters
    ----------
    x : shape (k, *shape), k stacked models or tensors (floating point)
    weights : shape (k,), non-negative, summing to 1 (e.g. one row of a mixing matrix)
    p : the power degree, ``p >= 1``; a Python number or a 0-d tensor (may require grad)

    Returns
    -------
    A tensor of shape ``shape`` and the dtype of ``x``. With ``p == 1`` it is the weighted
    arithmetic mean. Differentiable in ``x``, ``weights`` and ``p``, with finite gradients also
    where parameters are exactly zero.

    Raises
    ------
    ValueError
        if ``p < 1`` or not finite, ``weights`` is not a (k,) vector of non-negative values
        summing to 1, or the shapes of ``x`` and ``weights`` disagree
    """
    p_tensor = _check_inputs(x, weights, p)
    weights = weights.to(dtype=x.dtype)
    if not p_tensor.requires_grad and float(p_tensor) == 1.0:
        return torch.tensordot(weights, x, dims=1)  # type: ignore[no-any-return]
    # Rows with zero weight must not set the scale: a huge unweighted value would push every
    # weighted term into underflow.
    positive = weights > 0
    if not bool(positive.all()):
        x, weights = x[positive], weights[positive]
    mean: Tensor = _ScaledPowerMean.apply(x, weights, p_tensor.to(dtype=x.dtype))
    return mean


def _check_inputs(x: Tensor, weights: Tensor, p: float | Tensor) -> Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError(
            f"power_mean: x must be a floating-point tensor of shape (k, ...), got "
            f"{type(x).__name__} with shape {tuple(getattr(x, 'shape', ()))}"
        )
    if not torch.is_tensor(weights) or weights.shape != (x.shape[0],):
        raise ValueError(
            f"power_mean: weights must have shape ({x.shape[0]},) to match x of shape "
            f"{tuple(x.shape)}, got {tuple(getattr(weights, 'shape', ()))}"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(
            f"power_mean: weights must be finite and non-negative, got {weights.tolist()}"
        )
    total = float(weights.detach().double().sum())
    if abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE:
        raise ValueError(
            f"power_mean: weights must sum to 1 (within {_WEIGHT_SUM_TOLERANCE}), got sum "
            f"{total!r}; normalise them first (weights / weights.sum())"
        )
    p_tensor = torch.as_tensor(p)
    if p_tensor.ndim != 0:
        raise ValueError(f"power_mean: p must be a number or a 0-d tensor, got shape "
                         f"{tuple(p_tensor.shape)}")
    p_value = float(p_tensor.detach())
    if not p_value >= 1.0 or p_value == float("inf"):
        raise ValueError(f"power_mean: p must be a finite number >= 1, got {p_value!r}")
    return p_tensor


class _ScaledPowerMean(torch.autograd.Function):
    """Scaled power mean with an analytic backward (stable where autograd of pow is not).

    Forward, per coordinate, in the log2 domain (one log2 and one exp2 per element: several
    times faster than ``pow`` on CPU): L_j = log2|x_j|, S = 2**max_j L_j,
    |u_j|**p = 2**(p (L_j - log2 S)). Coordinates whose mirror-space sum s nearly cancels
    (|s| < _REFINE_BELOW * sum_j a_j |u_j|**p) lose precision in the p-th root, so they are
    recomputed in float64: the result is then accurate to about eps * S everywhere.

    With u_j = x_j / S, m_j = s_p(u_j), t = s_p^{-1}(s), out = S t and the root slope
    r = |s|**(1/p - 1) (capped at 1/eps, below which it carries no information):
      d out / d x_j = a_j |u_j|**(p-1) r
      d out / d a_j = S m_j r / p
      d out / d p   = S (r (sum_j a_j m_j ln|u_j|) / p - t ln|s| / p**2)
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weights: Tensor, p: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        k, n = flat.shape
        # The backward needs every mirrored value; without it one cache-sized block is reused
        # (a fresh model-sized buffer costs more in page faults than the arithmetic).
        keep = any(ctx.needs_input_grad)
        mirrored = flat.new_empty((k, n) if keep else (k, min(n, _BLOCK_COLUMNS)))
        s, log_scale = flat.new_empty(n), flat.new_empty(n)
        for start in range(0, n, _BLOCK_COLUMNS):
            cols = slice(start, start + _BLOCK_COLUMNS)
            width = min(_BLOCK_COLUMNS, n - start)
            _mirror_sum(flat[:, cols], weights, float(p),
                        mirrored[:, cols] if keep else mirrored[:, :width], s[cols],
                        log_scale[cols])
        t = s.abs().log2_().div_(float(p)).exp2_().copysign_(s)
        scale = log_scale.exp2_()
        ctx.save_for_backward(flat, mirrored, weights, p, scale, s, t)
        ctx.shape = x.shape
        return (t * scale).reshape(x.shape[1:])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        flat, mirrored, weights, p, scale, s, t = ctx.saved_tensors
        grad_out = grad_out.reshape(-1)
        eps, tiny = torch.finfo(flat.dtype).eps, torch.finfo(flat.dtype).tiny
        root_slope = s.abs().pow(1.0 / p - 1.0).clamp_(max=1.0 / eps)
        abs_u = flat.abs() / torch.where(scale > 0, scale, torch.ones_like(scale))
        grad_x = grad_weights = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_x = (weights[:, None] * abs_u.pow(p - 1.0) * (grad_out * root_slope))
            grad_x = grad_x.reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.mv(mirrored, grad_out * scale * root_slope / p)
        if ctx.needs_input_grad[2]:
            ds_dp = torch.mv((mirrored * abs_u.clamp(min=tiny).log()).T, weights)
            dt_dp = root_slope * ds_dp / p - t * s.abs().clamp(min=tiny).log() / p**2
            grad_p = (grad_out * scale * dt_dp).sum()
        return grad_x, grad_weights, grad_p


def _mirror_sum(x: Tensor, weights: Tensor, p: float, mirrored: Tensor, s: Tensor,
                log_scale: Tensor) -> None:
    """For (k, c) columns x, write s_p(x_j / S) into ``mirrored`` (k, c), the weighted sum over
    j into ``s`` (c,) and log2 S into ``log_scale`` (c,)."""
    shift = _log_magnitudes(x, mirrored, log_scale)
    _powered_sum(x, weights, p, mirrored, shift, s)


def _log_magnitudes(x: Tensor, logs: Tensor, log_scale: Tensor) -> Tensor:
    """log2|x_j| into ``logs`` (k, c), its column maximum log2 S into ``log_scale`` (c,);
    returns log2 S with 0 for all-zero columns (the shift ``_powered_sum`` takes)."""
    torch.abs(x, out=logs).log2_()  # -inf at zeros
    torch.amax(logs, dim=0, out=log_scale)  # -inf for an all-zero column: S = 0, out = 0
    return log_scale.nan_to_num(neginf=0.0)


def _powered_sum(x: Tensor, weights: Tensor, p: float, mirrored: Tensor, shift: Tensor,
                 s: Tensor) -> None:
    """From log2|x_j| in ``mirrored`` (overwritten with s_p(x_j / S)), the weighted sum over j
    of s_p(x_j / S) into ``s``; nearly cancelling coordinates are recomputed in float64."""
    # |u_j|**p in [0, 1], floored at the smallest normal float: a term that small is
    # negligible next to the largest (which is a_j * 1), and subnormals are ~100x slower.
    min_exponent = math.log2(torch.finfo(x.dtype).tiny)
    mirrored.sub_(shift).mul_(p).clamp_(min=min_exponent).exp2_()
    magnitude = torch.mv(mirrored.T, weights)  # sum_j a_j |m_j|
    mirrored.copysign_(x)
    torch.mv(mirrored.T, weights, out=s)
    ill = (s.abs() < _REFINE_BELOW * magnitude).nonzero().squeeze(1)
    if len(ill):
        u = x[:, ill].double() / shift[ill].double().exp2()
        s[ill] = torch.mv(torch.copysign(u.abs().pow(p), u).T, weights.double()).to(s.dtype)


@torch.no_grad()
def power_means(x: Tensor, weights: Tensor, degrees: Sequence[float]) -> Tensor:
    """``power_mean`` for several degrees at once, without gradients: the logs of ``x`` and
    the scale are computed once for all of them. Bit for bit ``power_mean``'s values.

    Parameters
    ----------
    x : shape (k, *shape), k stacked models or tensors (floating point)
    weights : shape (k,), non-negative, summing to 1
    degrees : c degrees, each ``>= 1`` (validated as ``power_mean`` does)

    Returns
    -------
    A tensor of shape (c, *shape): the power mean of each degree.
    """
    for p in degrees:
        _check_inputs(x, weights, p)
    weights = weights.to(dtype=x.dtype)
    out = x.new_empty((len(degrees), *x.shape[1:]))
    powered = [i for i, p in enumerate(degrees) if float(p) != 1.0]
    for i in set(range(len(degrees))) - set(powered):
        out[i] = torch.tensordot(weights, x, dims=1)
    if not powered:
        return out
    positive = weights > 0
    if not bool(positive.all()):
        x, weights = x[positive], weights[positive]
    flat, columns = x.reshape(x.shape[0], -1), out.reshape(len(degrees), -1)
    k, n = flat.shape
    logs, mirrored = flat.new_empty((k, min(n, _BLOCK_COLUMNS))), flat.new_empty(
        (k, min(n, _BLOCK_COLUMNS)))
    log_scale, s = flat.new_empty(min(n, _BLOCK_COLUMNS)), flat.new_empty(min(n, _BLOCK_COLUMNS))
    for start in range(0, n, _BLOCK_COLUMNS):
        width = min(_BLOCK_COLUMNS, n - start)
        block = flat[:, start:start + width]
        shift = _log_magnitudes(block, logs[:, :width], log_scale[:width])
        scale = log_scale[:width].exp2()
        for i in powered:
            p = float(torch.as_tensor(degrees[i]).to(x.dtype))  # as power_mean rounds it
            mirrored[:, :width].copy_(logs[:, :width])
            _powered_sum(block, weights, p, mirrored[:, :width], shift, s[:width])
            t = s[:width].abs().log2_().div_(p).exp2_().copysign_(s[:width])
            columns[i, start:start + width] = t * scale
    return out
