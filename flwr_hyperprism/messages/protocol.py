"""The message protocol between the orchestrator and the nodes: keys and record encodings.

Every key a message carries is defined here, once; the Flower strategy, the apps, plug-in mode
and its mod read them from this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, MetricRecord

from flwr_hyperprism.setup.config import RunConfig
from strategies.base.rule import NodeTask

NEIGHBOUR_PREFIX = "nbr."  # message records "nbr.<partition id>" carry neighbours' models
TASK_KEY = "hyperprism.task"  # the NodeTask record of a train message
RUN_KEY = "hyperprism.run"  # the run config record of a train message
INFO_KEY = "hyperprism.info"  # marks a request for the node's partition id
OWN_KEY = "hyperprism.own"  # the partition's own latest routed model, for a node without state
SESSION_KEY = "hyperprism.session"  # {"run-key": ...}: names the run's node checkpoints
REPORT_KEY = "hyperprism.report"  # asks a node to reply with the model it evaluated, as MODEL_KEY
MODEL_KEY = "model"  # a reply's record of the node's evaluated model (the model after the round)
STAGE_KEY = "stage"  # train-config key of configure_train: the round-trip's stage in its round
EVALUATE_KEY = "hyperprism.evaluate"  # plug-in mode: marks the evaluate messages the mod answers


def task_record(task: NodeTask) -> ConfigRecord:
    """``task`` as the ConfigRecord a train message carries under ``TASK_KEY``."""
    return ConfigRecord({"round": task.round, "neighbours": list(task.neighbours),
                         "weights": list(task.weights), "self-weight": task.self_weight,
                         "train": task.train, "stage": task.stage,
                         **{f"coef.{k}": v for k, v in task.coefficients.items()}})


def record_task(record: ConfigRecord) -> NodeTask:
    """The NodeTask a ``task_record`` encodes."""
    values: Mapping[str, Any] = record  # the types task_record wrote
    coefficients = {k[len("coef."):]: float(v) for k, v in values.items()
                    if k.startswith("coef.")}
    return NodeTask(int(values["round"]), tuple(int(n) for n in values["neighbours"]),
                    tuple(float(w) for w in values["weights"]), float(values["self-weight"]),
                    bool(values["train"]), coefficients, int(values["stage"]))


def run_record(config: RunConfig) -> ConfigRecord:
    """The run config as the ConfigRecord a message carries under ``RUN_KEY``."""
    values: dict[str, Any] = config.to_run_config()
    return ConfigRecord(values)


def metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    """A node's scalar metrics as the reply's MetricRecord."""
    values: dict[str, Any] = dict(metrics)
    return MetricRecord(values)


def scalar_metrics(record: MetricRecord) -> dict[str, float]:
    """The int/float entries of a MetricRecord (lists are left out of the round summary)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def record_int(record: ConfigRecord, key: str) -> int:
    """``record[key]`` as an int; KeyError if absent, TypeError if it is not a number."""
    value = record[key]
    if not isinstance(value, int | float | str):
        raise TypeError(f"config record key {key!r} is {value!r}, not a number")
    return int(value)
