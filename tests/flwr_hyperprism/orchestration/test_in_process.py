"""The in-process driver routes what the node rules return, by reference, like the Flower
adapter routes what the nodes reply (the two give the same rows: ``test_apps.py``)."""

from __future__ import annotations

from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.rounds import round_loop
from flwr_hyperprism.setup.config import RunConfig
from strategies import algorithm_spec


def test_each_partition_routes_the_shared_tensors_its_rule_returned_last(tmp_path):
    config = RunConfig(num_nodes=4, num_rounds=2, local_steps=1, eval_size=200, node_batching=False)
    returned: dict[int, dict] = {}

    def make_rule(config: RunConfig, pid: int):
        rule = algorithm_spec("dpsgd").make_rule(config, pid)
        step = rule.step

        def recording_step(state, task, neighbours):
            outcome = step(state, task, neighbours)
            returned[pid] = outcome.state.shared
            return outcome

        rule.step = recording_step
        return rule

    loop = round_loop(config.replace(algorithm="dpsgd"), tmp_path / "run")
    rows = run_in_process(loop, make_rule=make_rule)
    assert len(rows) == 3 and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert all(loop.routing.latest[pid] is returned[pid] for pid in range(4))
    assert loop.routing.received == dict.fromkeys(range(4), 3)
