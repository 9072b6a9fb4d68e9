"""The message protocol: records that carry a task and a run config survive the wire."""

from __future__ import annotations

from flwr_hyperprism.messages.protocol import record_task, run_record, task_record
from flwr_hyperprism.setup.config import RunConfig
from strategies import NodeTask


def test_node_task_survives_the_config_record_round_trip():
    task = NodeTask(7, (1, 4), (0.25, 0.2), 0.55, train=False, coefficients={"chi": 2.5})
    assert record_task(task_record(task)) == task


def test_the_run_config_survives_the_config_record_round_trip():
    config = RunConfig.build(num_nodes=7, p_mode="fixed", fixed_p=3.0, local_layers="fc2.*")
    assert RunConfig.from_run_config(dict(run_record(config))) == config
