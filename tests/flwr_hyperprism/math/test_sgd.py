"""flwr_hyperprism.math.sgd: torch.optim.SGD's trajectory, bit for bit, without torch.optim."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flwr_hyperprism.math.sgd import MomentumSGD


def trajectories(momentum: float, steps: int = 6) -> tuple[list[torch.Tensor], ...]:
    """The parameters after each step of ours and torch.optim.SGD's on one noisy problem: a
    small network, some steps where one parameter has no gradient."""
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                        torch.nn.Linear(4, 3)) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    mine = MomentumSGD(ours.parameters(), lr=0.3, momentum=momentum)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.3, momentum=momentum)
    seen: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for step in range(steps):
        x, y = torch.randn(8, 5), torch.randint(3, (8,))
        for model, optimizer, out in ((ours, mine, seen[0]), (theirs, reference, seen[1])):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if step % 3 == 1:
                model[2].bias.grad = None  # a parameter without a gradient is left alone
            optimizer.step()
            out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return seen


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_it_takes_torch_optim_sgd_s_steps_bit_for_bit(momentum):
    ours, theirs = trajectories(momentum)
    for step, (mine, reference) in enumerate(zip(ours, theirs)):
        assert torch.equal(mine, reference), f"step {step}"


def test_the_state_is_the_momentum_buffers_and_loads_back():
    model = torch.nn.Linear(3, 2)
    optimizer = MomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    assert optimizer.state() == {}
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state()
    assert sorted(state) == ["0.momentum_buffer", "1.momentum_buffer"]
    torch.testing.assert_close(state["1.momentum_buffer"], torch.ones(2))
    fresh = MomentumSGD(model.parameters(), lr=0.1, momentum=0.9)
    fresh.load_state(state)
    assert fresh.state().keys() == state.keys()
    state["0.momentum_buffer"].zero_()  # the optimizer keeps its own copies
    assert torch.count_nonzero(fresh.state()["0.momentum_buffer"]) > 0
    fresh.load_state({})
    assert fresh.state() == {}
    assert MomentumSGD(model.parameters(), lr=0.1).state() == {}  # no momentum, no buffers


@pytest.mark.parametrize(("state", "message"), [
    ({"2.momentum_buffer": torch.zeros(2)}, "'2.momentum_buffer' is not '<index>.momentum_buffer' "
                                            "for one of the 2 parameters"),
    ({"0.exp_avg": torch.zeros(2, 3)}, "'0.exp_avg' is not"),
    ({"1.momentum_buffer": torch.zeros(3)}, r"has shape \(3,\), its parameter \(2,\)"),
])
def test_a_state_that_does_not_fit_the_parameters_is_an_error(state, message):
    optimizer = MomentumSGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state(state)


@pytest.mark.parametrize(("settings", "message"), [
    ({"lr": 0.0}, "lr must be finite and > 0, got 0.0"),
    ({"lr": float("inf")}, "lr must be finite and > 0, got inf"),
    ({"lr": 0.1, "momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
])
def test_bad_settings_are_an_error(settings, message):
    with pytest.raises(ValueError, match=message):
        MomentumSGD([torch.zeros(2, requires_grad=True)], **settings)


def test_a_fresh_process_that_trains_a_node_does_not_import_torch_dynamo():
    # why MomentumSGD exists: every deployed round-trip is a fresh process
    script = ("import sys\n"
              "from flwr_hyperprism.setup.config import RunConfig\n"
              "from strategies.base.rule import NodeTask\n"
              "from strategies.hyperprism import HyperPrismNode\n"
              "config = RunConfig.build(num_nodes=3, momentum=0.9, p_mode='hypernetwork', "
              "eval_size=50)\n"
              "rule = HyperPrismNode.for_partition(config, 0)\n"
              "rule.step(rule.init_state(), NodeTask(1), {})\n"
              "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
