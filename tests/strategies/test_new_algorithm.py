"""Adding an algorithm is one module and one test file: a toy algorithm declared in a module
outside the package, registered, runs through the shared battery with no list edited."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import EXTRA_ALGORITHMS

REPO = Path(__file__).resolve().parents[2]

TOY = '''"""Median gossip: each node takes the coordinate-wise median of its own and its
neighbours' models (robust to a minority of bad neighbours), then trains locally."""

from __future__ import annotations

import torch

from strategies import AlgorithmSpec
from strategies.base.node import GossipNode, NoExtra
from strategies.base.plan import RoutingPlan


class MedianGossip(RoutingPlan):
    algorithm = "toy-median"
    description = "Median gossip"


class MedianNode(GossipNode[NoExtra]):
    def combine(self, models, weights, gen, metrics, extra):
        return {name: torch.stack([m[name] for m in models]).median(dim=0).values
                for name in self.learner.names}, extra


SPEC = AlgorithmSpec(MedianGossip, MedianNode)
'''


def test_a_toy_algorithm_from_one_module_runs_through_the_battery(tmp_path):
    module = tmp_path / "median_gossip.py"
    module.write_text(TOY)
    env = {**os.environ, EXTRA_ALGORITHMS: str(module)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-rA", "tests/strategies/test_battery.py", "-k", "toy-median"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = [line for line in run.stdout.splitlines()
           if line.startswith("PASSED") and "[toy-median]" in line]
    # every battery test over the registered algorithms (the mirror-mass conservation test
    # only runs for a rule that declares a conserved degree; the median conserves none)
    assert len(ran) >= 4, run.stdout[-3000:]
