"""Tests of the hypernetwork that picks the degrees."""

from __future__ import annotations

import re

import pytest
import torch

from flwr_hyperprism.math.hypernetwork import (
    HyperNetwork,
    gradient_summary,
    parse_candidates,
)
from flwr_hyperprism.math.models import DECISION, REPRESENTATION

CANDIDATES = (1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0)
SUMMARY_DIM = 6


def make_hn(seed: int = 0, select: str = "soft", summary_dim: int = SUMMARY_DIM,
            candidates=CANDIDATES) -> HyperNetwork:
    torch.manual_seed(seed)
    return HyperNetwork(summary_dim, candidates, embedding_dim=8, hidden=16, select=select)


def random_summary(seed: int, scale: float = 1.0, dim: int = SUMMARY_DIM) -> torch.Tensor:
    return scale * torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def backprop_both_degrees(hn: HyperNetwork, summary: torch.Tensor) -> dict[str, torch.Tensor]:
    hn.zero_grad()
    degrees = hn(summary)
    (degrees[REPRESENTATION] + degrees[DECISION]).backward()
    return degrees


# --- forward -------------------------------------------------------------------------------


@pytest.mark.parametrize("select", ("soft", "st"))
@pytest.mark.parametrize("scale", (0.0, 1.0, 1e3, 1e6))
def test_degrees_lie_within_the_candidate_range(select, scale):
    for seed in range(10):
        degrees = make_hn(seed, select)(random_summary(seed, scale))

        assert set(degrees) == {REPRESENTATION, DECISION}
        for p in degrees.values():
            assert p.shape == () and bool(torch.isfinite(p))
            assert min(CANDIDATES) <= p.item() <= max(CANDIDATES)


def test_the_two_heads_differ_after_random_init():
    for seed in range(5):
        degrees = make_hn(seed)(random_summary(seed))
        assert degrees[REPRESENTATION].item() != degrees[DECISION].item()


def test_soft_degree_is_the_softmax_expectation():
    hn = make_hn(1)
    summary = random_summary(1)
    hidden = hn.trunk(torch.cat([hn.embedding, summary]))
    candidates = torch.tensor(CANDIDATES)

    degrees = hn(summary)

    for group, head in hn.heads.items():
        expected = torch.softmax(head(hidden), dim=-1) @ candidates
        torch.testing.assert_close(degrees[group], expected)


def test_gradient_summary_input_changes_the_degrees():
    hn = make_hn(2)

    assert hn(random_summary(1))[DECISION].item() != hn(random_summary(2))[DECISION].item()


def test_embedding_only_mode_ignores_the_summary():
    hn = make_hn(3, summary_dim=0)

    first, second = hn(torch.empty(0)), hn(random_summary(5))

    assert hn.trunk[0].in_features == hn.embedding.numel()
    for group in (REPRESENTATION, DECISION):
        assert first[group].item() == second[group].item()


def test_st_mode_returns_exactly_a_candidate_but_keeps_the_gradient():
    for seed in range(5):
        hn = make_hn(seed, "st")
        degrees = backprop_both_degrees(hn, random_summary(seed))

        for p in degrees.values():
            assert p.item() in CANDIDATES
        assert hn.embedding.grad is not None and hn.embedding.grad.abs().sum() > 0
        assert all(param.grad is not None for param in hn.parameters())


def test_st_and_soft_share_the_gradient():
    soft, st = make_hn(4, "soft"), make_hn(4, "st")
    summary = random_summary(4)

    backprop_both_degrees(soft, summary)
    backprop_both_degrees(st, summary)

    for (name, a), (_, b) in zip(soft.named_parameters(), st.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("summary_dim", (SUMMARY_DIM, 0))
@pytest.mark.parametrize("select", ("soft", "st"))
def test_gradients_reach_every_parameter_and_the_embedding(select, summary_dim):  # inv. 20
    hn = make_hn(5, select, summary_dim)
    backprop_both_degrees(hn, random_summary(5, dim=summary_dim))

    names = {name for name, _ in hn.named_parameters()}
    assert "embedding" in names and any(n.startswith("trunk.") for n in names)
    assert {f"heads.{g}.weight" for g in (REPRESENTATION, DECISION)} <= names
    for name, param in hn.named_parameters():
        assert param.grad is not None, name
        assert bool(torch.isfinite(param.grad).all()), name
        assert param.grad.abs().sum() > 0, name


def test_each_head_only_gets_its_own_degree_gradient():
    hn = make_hn(6)
    hn(random_summary(6))[DECISION].backward()

    assert hn.heads[REPRESENTATION].weight.grad is None
    assert hn.heads[DECISION].weight.grad.abs().sum() > 0


def test_candidates_are_a_buffer_not_a_parameter():
    hn = make_hn(7, candidates=(1.0, 9.0))

    assert torch.equal(hn.candidates, torch.tensor([1.0, 9.0]))
    assert all(param is not hn.candidates for param in hn.parameters())
    assert "candidates" not in hn.state_dict()


def test_unknown_select_mode_raises():
    with pytest.raises(ValueError, match=r"'argmax'.*soft.*st"):
        HyperNetwork(SUMMARY_DIM, CANDIDATES, select="argmax")


# --- gradient_summary ----------------------------------------------------------------------


def test_gradient_summary_is_mean_std_norm_per_tensor():
    grads = [torch.tensor([[1.0, -1.0], [3.0, 1.0]], dtype=torch.float64), torch.tensor([2.0])]

    summary = gradient_summary(grads)

    expected = torch.tensor([1.0, 2.0 ** 0.5, 12.0 ** 0.5, 2.0, 0.0, 2.0])
    assert summary.dtype == torch.float32 and summary.shape == (3 * len(grads),)
    torch.testing.assert_close(summary, expected)


def test_gradient_summary_is_detached():
    grad = torch.randn(5, requires_grad=True)

    assert not gradient_summary([grad * 2]).requires_grad


# --- parse_candidates ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1,3,5", (1.0, 3.0, 5.0)),
    (" 1 , 9 ,15 ", (1.0, 9.0, 15.0)),
    ("1,,3,", (1.0, 3.0)),
    ("2.5", (2.5,)),
])
def test_parse_candidates(text, expected):
    assert parse_candidates(text) == expected


@pytest.mark.parametrize("text", ("", " , ", "1,three", "1;3", "0.5,3", "1,-3", "0"))
def test_parse_candidates_rejects_bad_lists(text):
    with pytest.raises(ValueError, match="p-candidates.*" + re.escape(repr(text))):
        parse_candidates(text)


@pytest.mark.parametrize("p_init", [1.0, 7.0, 15.0])
def test_p_init_starts_both_heads_near_that_degree(p_init):
    torch.manual_seed(0)
    net = HyperNetwork(6, (1, 3, 5, 7, 9, 11, 13, 15), p_init=p_init)
    degrees = net(torch.zeros(6))
    for p in degrees.values():
        assert abs(float(p) - p_init) < 0.5


def test_p_init_outside_the_candidates_is_rejected():
    with pytest.raises(ValueError, match="hn-p-init=20"):
        HyperNetwork(6, (1, 3, 5), p_init=20.0)
