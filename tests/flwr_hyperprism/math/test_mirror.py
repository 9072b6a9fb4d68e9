"""Tests of the mirror map and the weighted power mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flwr_hyperprism.math.mirror import (
    inverse_sign_power,
    mirror_step,
    power_mean,
    power_means,
    sign_power,
)

P_VALUES = (1, 1.5, 3, 9, 15, 33, 64)
ODD_P = (1, 3, 5, 9, 15)
K_VALUES = (1, 2, 5, 8)


# --- helpers -------------------------------------------------------------------------------------


def reference_power_mean(x, weights, p) -> np.ndarray:
    """WPM_p in float64 NumPy, scaled by the per-coordinate max |x| (exact by homogeneity).

    Written independently of the module (NumPy, no torch), so it can serve as the reference.
    """
    x = np.asarray(x, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    scale = np.abs(x).max(axis=0)
    safe = np.where(scale > 0, scale, 1.0)
    u = x / safe
    s = np.tensordot(weights, np.sign(u) * np.abs(u) ** p, axes=1)
    return np.where(scale > 0, safe * np.sign(s) * np.abs(s) ** (1.0 / p), 0.0)


def naive_power_mean(x: torch.Tensor, weights: torch.Tensor, p: float) -> torch.Tensor:
    """The unscaled definition s_p^{-1}(sum_j a_j s_p(x_j)), from the module's own maps."""
    return inverse_sign_power(torch.tensordot(weights.to(x.dtype), sign_power(x, p), dims=1), p)


def random_weights(rng: np.random.Generator, k: int) -> torch.Tensor:
    """A float64 probability vector of length k with all entries > 0."""
    return torch.from_numpy(rng.dirichlet(np.ones(k)))


def signed_log_uniform(rng: np.random.Generator, shape, low=-8.0, high=3.0) -> torch.Tensor:
    """Float64 values with random signs and magnitudes log-uniform in [10**low, 10**high]."""
    magnitude = 10.0 ** rng.uniform(low, high, size=shape)
    return torch.from_numpy(np.where(rng.random(shape) < 0.5, -magnitude, magnitude))


def signed_uniform(rng: np.random.Generator, shape, low=0.1, high=2.0) -> torch.Tensor:
    """Float64 values with random signs and magnitudes uniform in [low, high] (away from 0)."""
    magnitude = rng.uniform(low, high, size=shape)
    return torch.from_numpy(np.where(rng.random(shape) < 0.5, -magnitude, magnitude))


def max_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=0)


# --- accuracy against the float64 reference ------------------------------------------------------

# Error model of the scaled float32 evaluation, relative to S = max_j |x_j|: u_j = x_j / S and
# the powers carry relative error ~p*eps, so s = sum_j a_j s_p(u_j) has absolute error
# ~p*eps*sum_j a_j|s_p(u_j)|, and the root t = s**(1/p) divides that by p*|s|**(1-1/p): the
# result is off by ~eps * (sum_j a_j |s_p(u_j)|) / |s| (times |t| <= 1). With magnitudes spread
# log-uniformly over 11 decades the largest |x_j| dominates each coordinate, the cancellation
# ratio stays small, and 1e-4 * S (~ 1000 float32 ulps of S) is a bound with a wide margin that a
# wrong formula (errors of order S) cannot meet.
REFERENCE_TOLERANCE = 1e-4


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("p", P_VALUES)
def test_float32_matches_float64_reference(p, k):
    rng = np.random.default_rng([17, k, int(p * 10)])
    x = signed_log_uniform(rng, (k, 2048)).float()
    weights = random_weights(rng, k).float()

    out = power_mean(x, weights, p)

    assert out.dtype == torch.float32 and out.shape == (2048,)
    expected = reference_power_mean(x.double().numpy(), weights.double().numpy(), p)
    error = np.abs(out.double().numpy() - expected) / max_abs(x).double().numpy()
    assert error.max() <= REFERENCE_TOLERANCE


@pytest.mark.parametrize("p", (9, 15, 33, 64))
def test_float32_large_p_is_computed_like_float64(p):
    """The reference advice "compute in float64 for p >= 9".

    Neighbours' values of similar size and opposite sign nearly cancel in mirror space; a float32
    evaluation then loses up to ~(p*eps)**(1/p) of S, while a float64 evaluation rounded to
    float32 is within one float32 ulp of the reference. 1e-6 * S is ~8 ulps.
    """
    rng = np.random.default_rng([23, p])
    x = signed_uniform(rng, (8, 20_000), low=0.0, high=1.0).float()
    weights = random_weights(rng, 8).float()

    out = power_mean(x, weights, p)

    expected = reference_power_mean(x.double().numpy(), weights.double().numpy(), p)
    error = np.abs(out.double().numpy() - expected) / max_abs(x).double().numpy()
    assert error.max() <= 1e-6


@pytest.mark.parametrize(("p", "value", "weight"), [(9, 0.94105375, 0.36660826),
                                                     (64, 0.98954606, 0.33792076)])
def test_float32_cancellation_example(p, value, weight):
    """Minimal instances of the above: x = (-1, value), a = (weight, 1 - weight) in float32.

    The exact means are 0.1174 (p = 9) and -0.7385 (p = 64); a float32 evaluation of the
    scaled form gives 0.1458 and +0.7628 (wrong sign).
    """
    x = torch.tensor([[-1.0], [value]])
    a0 = torch.tensor(weight)
    weights = torch.stack([a0, 1 - a0])

    out = power_mean(x, weights, p)

    expected = reference_power_mean(x.double().numpy(), weights.double().numpy(), p)
    assert out.item() == pytest.approx(expected.item(), abs=1e-6)


# --- properties of the power mean ----------------------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES)
def test_identical_inputs_give_that_input(p):
    rng = np.random.default_rng(1)
    value = signed_log_uniform(rng, (64,))
    x = value.expand(5, 64).clone()

    out = power_mean(x, random_weights(rng, 5), p)

    torch.testing.assert_close(out, value, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("p", (1, 1.0, torch.tensor(1.0, dtype=torch.float64),
                               torch.tensor(1.0, dtype=torch.float64, requires_grad=True)))
def test_p_one_is_weighted_arithmetic_mean(p):
    rng = np.random.default_rng(2)
    x, weights = signed_log_uniform(rng, (6, 100)), random_weights(rng, 6)

    out = power_mean(x, weights, p)

    torch.testing.assert_close(out, (weights[:, None] * x).sum(0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_mean_lies_between_min_and_max(p, dtype):
    rng = np.random.default_rng([3, int(p)])
    x = signed_log_uniform(rng, (5, 500)).to(dtype)

    out = power_mean(x, random_weights(rng, 5), p)

    slack = 4 * torch.finfo(dtype).eps * max_abs(x)  # the final rounding of t * S
    assert bool((out >= x.amin(0) - slack).all()) and bool((out <= x.amax(0) + slack).all())


def test_nonnegative_inputs_non_decreasing_in_p():
    rng = np.random.default_rng(4)
    x = signed_log_uniform(rng, (6, 300)).abs()
    weights = random_weights(rng, 6)
    degrees = (1, 1.0001, 1.5, 2, 3, 9, 15, 33, 64, 200)

    means = torch.stack([power_mean(x, weights, p) for p in degrees])

    assert bool((means.diff(dim=0) >= -1e-12 * x.amax(0)).all())


def test_nonnegative_inputs_tend_to_max_of_weighted_rows():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.uniform(0.0, 5.0, size=(5, 200)))
    x[4] = 100.0  # largest row, but weight 0: must not be the limit
    weights = torch.cat([random_weights(rng, 4), torch.zeros(1, dtype=torch.float64)])
    limit = x[:4].amax(0)

    gaps = [(limit - power_mean(x, weights, p)).max().item() for p in (10, 100, 1000, 10_000)]

    assert all(g >= -1e-12 for g in gaps)
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] <= 1e-3 * limit.max().item()


def test_signed_counterexample_is_not_monotone_and_tends_to_largest_magnitude():
    x = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)

    def mean(p):
        return power_mean(x, weights, p).item()

    assert mean(1) == pytest.approx(-0.25, abs=1e-15)
    assert mean(3) == pytest.approx(-(0.4375 ** (1 / 3)), rel=1e-12)  # -0.7591...
    assert mean(3) == pytest.approx(-0.76, abs=5e-3)
    assert mean(3) < mean(1)  # decreases in p although x has a positive entry
    assert mean(10_000) == pytest.approx(-1.0, abs=1e-3)


def test_signed_inputs_tend_to_the_value_of_largest_magnitude():
    rng = np.random.default_rng(6)
    x = signed_uniform(rng, (4, 300), low=0.1, high=1.0)
    winner = torch.from_numpy(rng.integers(0, 4, size=300))
    columns = torch.arange(300)
    x[winner, columns] = 2.0 * x[winner, columns].sign()  # the unique largest |x| per column
    weights = random_weights(rng, 4)

    out = power_mean(x, weights, 10_000)

    torch.testing.assert_close(out, x[winner, columns], rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("c", (-3.0, -1.0, -0.5, 0.0, 0.25, 2.0, 1e3))
@pytest.mark.parametrize("p", (1.5, 3, 15, 64))
def test_homogeneous_and_odd(p, c):
    rng = np.random.default_rng(7)
    x, weights = signed_log_uniform(rng, (4, 100)), random_weights(rng, 4)

    torch.testing.assert_close(power_mean(c * x, weights, p), c * power_mean(x, weights, p),
                               rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("p", P_VALUES)
def test_permutation_invariant(p):
    rng = np.random.default_rng(8)
    x, weights = signed_log_uniform(rng, (7, 100)), random_weights(rng, 7)
    order = torch.from_numpy(rng.permutation(7))

    torch.testing.assert_close(power_mean(x[order], weights[order], p),
                               power_mean(x, weights, p), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("p", P_VALUES)
def test_scaled_form_equals_naive_form_without_overflow(p):
    rng = np.random.default_rng(9)
    x = signed_log_uniform(rng, (5, 200), low=-1.0, high=1.0)  # |x|**64 stays in float64 range
    weights = random_weights(rng, 5)

    torch.testing.assert_close(power_mean(x, weights, p), naive_power_mean(x, weights, p),
                               rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("p", ODD_P)
def test_appendix_inequalities_for_odd_integer_p(p):
    rng = np.random.default_rng([10, p])
    x, weights = signed_uniform(rng, (5, 400), low=0.0, high=3.0), random_weights(rng, 5)
    arithmetic = (weights[:, None] * x).sum(0)
    out = power_mean(x, weights, p)
    tol = 1e-12

    c = 1.0 / (2 * p)
    assert bool((out >= c * arithmetic + (1 - c) * x.amin(0) - tol).all())
    assert bool((out <= c * arithmetic + (1 - c) * x.amax(0) + tol).all())

    x = x.abs()
    arithmetic = (weights[:, None] * x).sum(0)
    out = power_mean(x, weights, p)
    assert bool((out >= arithmetic - tol).all())
    assert bool((out <= arithmetic / p + (p - 1) / p * x.amax(0) + tol).all())


@pytest.mark.parametrize("p", P_VALUES)
def test_inverse_sign_power_inverts_sign_power(p):
    u = signed_log_uniform(np.random.default_rng(11), (1000,), low=-3.0, high=3.0)
    u = torch.cat([u, torch.zeros(1, dtype=u.dtype)])

    torch.testing.assert_close(inverse_sign_power(sign_power(u, p), p), u, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("p", ODD_P)
def test_sign_power_is_the_literal_power_for_odd_p(p):
    u = signed_uniform(np.random.default_rng(12), (1000,), low=0.0, high=2.0)

    torch.testing.assert_close(sign_power(u, p), u**p, rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("p", P_VALUES)
def test_sign_power_is_odd_and_strictly_increasing(p):
    u = torch.linspace(-2.0, 2.0, 401, dtype=torch.float64)

    v = sign_power(u, p)

    assert torch.equal(sign_power(-u, p), -v)
    assert bool((v.diff() > 0).all())


# --- zero weights and zero columns ---------------------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES)
def test_zero_weight_rows_are_ignored(p):
    rng = np.random.default_rng(13)
    x = signed_log_uniform(rng, (3, 100), low=-2.0, high=2.0).float()
    weights = random_weights(rng, 3).float()
    huge = torch.full((1, 100), 1e30)  # would underflow every weighted term if it set the scale

    out = power_mean(torch.cat([x[:1], huge, x[1:]]),
                     torch.cat([weights[:1], torch.zeros(1), weights[1:]]), p)

    torch.testing.assert_close(out, power_mean(x, weights, p), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_all_zero_columns_give_zero(p, dtype):
    rng = np.random.default_rng(14)
    x = signed_log_uniform(rng, (4, 10)).to(dtype)
    x[:, ::3] = 0.0

    out = power_mean(x, random_weights(rng, 4), p)

    assert bool((out[::3] == 0).all())
    assert bool((out[1::3] != 0).all())


# --- gradients -----------------------------------------------------------------------------------


def _gradcheck_inputs(seed: int, k: int = 3, n: int = 4):
    rng = np.random.default_rng(seed)
    x = signed_uniform(rng, (k, n)).requires_grad_()
    weights = random_weights(rng, k).requires_grad_()
    return x, weights


@pytest.mark.parametrize("p", (1.0001, 1.5, 2, 3, 9, 15, 64))
def test_gradcheck_wrt_x_weights_and_p(p):
    x, weights = _gradcheck_inputs(seed=int(p * 100))
    p_tensor = torch.tensor(float(p), dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(power_mean, (x, weights, p_tensor), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("p", (1, 3, 15))
def test_gradcheck_wrt_x_and_weights_with_constant_p(p):
    x, weights = _gradcheck_inputs(seed=p)

    assert torch.autograd.gradcheck(lambda x, w: power_mean(x, w, p), (x, weights),
                                    eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("p", (1, 1.0001, 2, 9, 64))
def test_gradients_finite_at_exact_zeros(p, dtype):
    x = torch.tensor([[0.0, 0.0, 0.5, -1.0, 0.0],
                      [0.0, 2.0, 0.0, 1.0, 0.0],
                      [0.0, -1.0, 0.0, 0.0, 3.0]], dtype=dtype, requires_grad=True)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=dtype, requires_grad=True)
    p_tensor = torch.tensor(float(p), dtype=dtype, requires_grad=True)

    out = power_mean(x, weights, p_tensor)
    (out * torch.arange(1.0, 6.0, dtype=dtype)).sum().backward()

    assert out[0].item() == 0.0
    for grad in (x.grad, weights.grad, p_tensor.grad):
        assert grad is not None and bool(torch.isfinite(grad).all())


def test_float32_p64_finite_over_wide_magnitudes():
    rng = np.random.default_rng(15)
    x = signed_log_uniform(rng, (8, 4096)).float().requires_grad_()
    p = torch.tensor(64.0, requires_grad=True)

    out = power_mean(x, random_weights(rng, 8).float(), p)
    out.sum().backward()

    assert bool(torch.isfinite(out).all())
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(p.grad))


def test_p_as_0d_tensor_gets_gradient_zero_at_consensus():
    rng = np.random.default_rng(16)
    x, weights = signed_uniform(rng, (4, 50)), random_weights(rng, 4)
    p = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)

    power_mean(x, weights, p).sum().backward()
    assert p.grad is not None and abs(p.grad.item()) > 1e-3  # neighbours differ

    p.grad = None
    power_mean(x[:1].expand(4, 50), weights, p).sum().backward()  # consensus
    assert abs(p.grad.item()) < 1e-10


# --- input validation ----------------------------------------------------------------------------

_X = torch.ones(3, 2)
_W = torch.full((3,), 1 / 3)

INVALID = {
    "p below 1": (_X, _W, 0.5),
    "p nan": (_X, _W, float("nan")),
    "p inf": (_X, _W, float("inf")),
    "p tensor below 1": (_X, _W, torch.tensor(0.99)),
    "p shape (2,)": (_X, _W, torch.tensor([3.0, 3.0])),
    "negative weight": (_X, torch.tensor([1.5, -0.25, -0.25]), 3),
    "weights sum 0.9": (_X, torch.tensor([0.3, 0.3, 0.3]), 3),
    "weights nan": (_X, torch.tensor([float("nan"), 0.5, 0.5]), 3),
    "weights shape (4,)": (_X, torch.full((4,), 0.25), 3),
    "weights shape (3, 1)": (_X, _W[:, None], 3),
    "weights a list": (_X, [1 / 3] * 3, 3),
    "integer x": (torch.ones(3, 2, dtype=torch.int64), _W, 3),
    "x not a tensor": (np.ones((3, 2)), _W, 3),
}


@pytest.mark.parametrize("args", INVALID.values(), ids=INVALID.keys())
def test_invalid_inputs_raise_value_error(args):
    with pytest.raises(ValueError, match="power_mean"):
        power_mean(*args)


def test_small_weight_rounding_is_accepted():
    weights = torch.tensor([0.1] * 10, dtype=torch.float32)  # sums to 1 only up to rounding
    assert math.isclose(power_mean(torch.ones(10, 1), weights, 3).item(), 1.0, rel_tol=1e-6)


# --- mirror_step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p", (1.0, 3.0, 9.0, 64.0))
def test_mirror_step_adds_the_step_in_mirror_space(p):
    rng = np.random.default_rng(11)
    w = signed_log_uniform(rng, (500,)).float()
    step = (signed_log_uniform(rng, (500,)) * 1e-3).float()
    out = mirror_step(w, step, p)
    assert bool(torch.isfinite(out).all())
    w64, step64 = w.double().numpy(), step.double().numpy()
    if p == 1.0:
        assert torch.equal(out, w + step)
        return
    # float64 reference in the same scaled form (the unscaled one overflows for p = 64)
    root = np.sign(step64) * np.abs(step64) ** (1 / p)
    scale = np.maximum(np.abs(w64), np.abs(root))
    inner = np.sign(w64) * np.abs(w64 / scale) ** p + np.sign(root) * np.abs(root / scale) ** p
    expected = scale * np.sign(inner) * np.abs(inner) ** (1 / p)
    assert np.max(np.abs(out.double().numpy() - expected) / scale) < 1e-4
    zero = mirror_step(torch.zeros(3), torch.zeros(3), p)
    assert torch.equal(zero, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_means_of_several_degrees_are_power_means_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 300, generator=gen, dtype=dtype) * torch.logspace(-20, 20, 300,
                                                                          dtype=dtype)
    x[:, :10] = 0.0  # all-zero columns
    x[2, 10:20] = 0.0
    x[:, 20:30] = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0], dtype=dtype)[:, None]  # cancels
    weights = torch.tensor([0.3, 0.0, 0.2, 0.25, 0.25], dtype=dtype)  # a zero weight too
    degrees = [1.0, 1.4, 3.0, 15.0, 101.0]
    means = power_means(x.reshape(5, 30, 10), weights, degrees)
    assert means.shape == (5, 30, 10)
    for p, mean in zip(degrees, means):
        assert torch.equal(mean, power_mean(x.reshape(5, 30, 10), weights, p)), p
    with pytest.raises(ValueError, match="p must be a finite number >= 1"):
        power_means(x, weights, [1.0, 0.5])
