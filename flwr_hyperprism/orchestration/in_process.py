"""The in-process driver: an algorithm's plan and node rules for all rounds in this process,
without Flower (what sweeps run).

Same plan, node rules and metrics as a Flower run (models are passed by reference instead of
messages); all partitions form one node group (``strategies.base.group``: with
``node-batching`` their training and evaluation are batched), so the same seed and config give
the same metrics.jsonl rows as a Flower run up to float rounding, and exactly the same as
another in-process run. With ``state-dir``
the nodes checkpoint their state as in a Flower run, so that ``resume=true`` continues an
interrupted run with the same metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr_hyperprism.setup.config import RunConfig
from strategies import algorithm_spec
from strategies.base import learner
from strategies.base.checkpoint import node_checkpoints, starting_state
from strategies.base.group import NodeGroup
from strategies.base.node import LearningNode
from strategies.base.rule import NodeState, StateDict

from .metrics import Row
from .rounds import NodeMetrics, RoundLoop


def run_in_process(loop: RoundLoop, *,
                   make_rule: Callable[[RunConfig, int], LearningNode] | None = None,
                   initial_model: StateDict | None = None) -> list[Row]:
    """Run ``loop``'s rounds with every node's rule in this process; the metrics rows.

    ``make_rule`` defaults to the algorithm's registered node rule, ``initial_model`` to
    ``strategies.base.learner.initial_model`` of the config.
    """
    config = loop.config
    make_rule = make_rule or algorithm_spec(config.algorithm).make_rule
    if initial_model is None:
        initial_model = learner.initial_model(config)
    group = NodeGroup({pid: make_rule(config, pid) for pid in range(config.num_nodes)},
                      config.node_batching, config.node_threads)
    loop.log_summary()
    resumed = loop.open(initial_model, lambda tensors: tensors)
    checkpoints = {pid: node_checkpoints({}, config.state_dir, loop.store.run_key, pid)
                   for pid in group.rules}
    states: dict[int, NodeState] = {}
    routing = loop.routing

    def round_trip(round_: int, stage: int) -> tuple[NodeMetrics, dict]:
        tasks = loop.tasks(round_, stage)
        starting = {pid: starting_state(task, states.get(pid), checkpoints[pid],
                                        routing.latest.get(pid) if resumed else None,
                                        group.rules[pid].init_state, group.rules[pid].restore,
                                        pid)
                    for pid, task in tasks.items()}
        outcomes = group.step(starting, tasks, routing.latest)
        for pid, (state, _, _) in outcomes.items():
            states[pid] = state
            saver = checkpoints[pid]
            if saver is not None:
                saver.save(state, stage)
        for pid, state in states.items():
            routing.store(pid, state.shared, round_)
        return {pid: outcome.metrics for pid, outcome in outcomes.items()}, {}

    return loop.run(round_trip)
