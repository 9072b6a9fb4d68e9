"""The algorithm variants the shared batteries run, and helpers to build and read them.

Every registered algorithm is a variant with its defaults, read from the registry, so a new
algorithm is covered by every test that iterates over ``VARIANTS`` without being listed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from flwr_hyperprism.setup.config import RunConfig
from flwr_hyperprism.setup.settings import owners
from strategies import ALGORITHMS, NodeRule
from strategies.base.plan import RoutingPlan

# Variants beyond each registered algorithm's defaults: name -> (algorithm, config changes).
MODES: dict[str, tuple[str, dict]] = {
    "hyperprism-fixed-p3": ("hyperprism", {"p_mode": "fixed", "fixed_p": 3.0}),
    "hyperprism-fixed-p3-cta": ("hyperprism", {"p_mode": "fixed", "fixed_p": 3.0,
                                               "order": "cta"}),
    "hyperprism-tracking": ("hyperprism", {"p_mode": "tracking"}),
    "hyperprism-hypernetwork": ("hyperprism", {"p_mode": "hypernetwork"}),
    "dpsgd-cta": ("dpsgd", {"order": "cta"}),
}


def variant(name: str) -> tuple[str, dict]:
    """(algorithm, config changes) of a variant: a mode above, or a registered algorithm with
    its defaults (also one registered after this module was imported)."""
    if name in MODES:
        return MODES[name]
    if name in ALGORITHMS:
        return name, {}
    raise KeyError(f"{name!r} is neither a registered algorithm nor one of {sorted(MODES)}")


# Every registered algorithm with its defaults, then the modes: the batteries run all of them.
VARIANTS = [*sorted(ALGORITHMS), *MODES]


def conserved_degree(name: str) -> float | None:
    """The degree whose mirror-space mass variant ``name``'s rounds conserve (None: none)."""
    algorithm, changes = variant(name)
    spec = ALGORITHMS[algorithm]
    return spec.node_rule.conserved_degree(RunConfig.build(algorithm, **changes))


def model_groups(rule: NodeRule) -> tuple[str, ...]:
    """The state groups that hold a rule's model (the evaluated one first)."""
    return getattr(rule, "model_groups", ("shared",))


def own_changes(algorithm: str, changes: Mapping[str, object]) -> dict[str, object]:
    """``changes`` less other algorithms' settings: a battery passes e.g. mudag_max_gossip=2
    (Mudag's shorter rounds) to every variant, and each takes what it has."""
    return {key: value for key, value in changes.items()
            if not owners(key) or algorithm in owners(key)}


def config_of(algorithm: str, **changes: object) -> RunConfig:
    """``algorithm``'s config with ``changes`` (see ``own_changes``), node after node unless
    ``node_batching`` is given: batched metrics depend on the group layout to float rounding,
    so runs compared exactly across engines (in-process: one group; Flower: one per node) step
    their nodes one by one (tests/strategies/base/test_group.py compares the two paths)."""
    return RunConfig.build(algorithm, **own_changes(algorithm,
                                                    {"node_batching": False, **changes}))


def make_config(tmp_path: Path, name: str, **changes: object) -> RunConfig:
    """A small, fast config of variant ``name`` (6 nodes, 2 rounds of 2 local steps)."""
    algorithm, variant_changes = variant(name)
    settings = {"num_nodes": 6, "num_rounds": 2, "local_steps": 2, "eval_size": 500,
                "output_dir": str(tmp_path), "run_name": name}
    return config_of(algorithm, **{**settings, **variant_changes, **changes})


def nodes_for(config: RunConfig) -> tuple[RoutingPlan, dict[int, NodeRule]]:
    """The plan of ``config``'s orchestrator and the node rule of every partition."""
    spec = ALGORITHMS[config.algorithm]
    return (spec.plan(config),
            {pid: spec.make_rule(config, pid) for pid in range(config.num_nodes)})


def metrics_rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl rows without their timings (which differ between runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def spread_states(rules, seed: int = 1, identical: bool = False) -> dict:
    """Initial states whose models are random (one common random model if ``identical``)."""
    gen = torch.Generator().manual_seed(seed)
    states = {}
    template = None
    for pid, rule in rules.items():
        state = rule.init_state()
        groups = model_groups(rule)
        if template is None or not identical:
            template = {k: torch.randn(v.shape, generator=gen)
                        for k, v in state.tensors[groups[0]].items()}
        for group in groups:
            state.tensors[group] = {k: v.clone() for k, v in template.items()}
        states[pid] = state
    return states


def drive(strategy, rules, states, rounds: int) -> list[torch.Tensor]:
    """Round-trips of rounds 1..rounds; the stacked, flattened models (float64) at the start
    and after the stage-0 round-trip of each round (for Mudag, round r's stage 0 completes
    round r - 1)."""
    group = model_groups(rules[0])[0]
    names = list(rules[0].init_state().tensors[group])  # the model (not what rides with it)

    def stacked():
        return torch.stack([torch.cat([states[p].tensors[group][n].reshape(-1) for n in names])
                            for p in sorted(states)]).double()

    history = [stacked()]
    for round_, stage in strategy.schedule():
        if round_ > rounds:
            break
        latest = {p: s.shared for p, s in states.items()}
        for pid, task in strategy.plan_round(round_, latest, stage).items():
            states[pid], _, _ = rules[pid].step(states[pid], task,
                                             {j: latest[j] for j in task.neighbours})
        if stage == 0:
            history.append(stacked())
    return history
