"""The message protocol between the orchestrator and the nodes: keys and record encodings.

Every key a message carries is defined here, once; the Flower strategy, the apps, plug-in mode
and its mod read them from this module.

A train message goes to one Flower node for all the partitions it hosts (its node group): a
task per partition (``<TASK_KEY>.<partition>``), each neighbour model any of them needs once
(``nbr.<partition>``), a partition's own routed model when its node may lack its state
(``<OWN_KEY>.<partition>``) and the records all share (run config, session, train config).
The reply holds, per partition, its shared tensors (``arrays.<partition>``), its metrics
(``metrics.<partition>``) and, when asked, its evaluated model (``model.<partition>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flwr_hyperprism.setup.config import RunConfig
from strategies.base.rule import NodeTask, StateDict

NEIGHBOUR_PREFIX = "nbr."  # message records "nbr.<partition id>" carry neighbours' models
TASK_KEY = "hyperprism.task"  # the NodeTask record of a train message
RUN_KEY = "hyperprism.run"  # the run config record of a train message
INFO_KEY = "hyperprism.info"  # marks a request for the node's partition id
OWN_KEY = "hyperprism.own"  # the partition's own latest routed model, for a node without state
SESSION_KEY = "hyperprism.session"  # {"run-key": ...}: names the run's node checkpoints
REPORT_KEY = "hyperprism.report"  # asks a node to reply with the model it evaluated, as MODEL_KEY
SHARED_KEY = "arrays"  # a reply's records "arrays.<partition>": the tensors a node routes on
METRICS_KEY = "metrics"  # a reply's records "metrics.<partition>": the node's scalar metrics
MODEL_KEY = "model"  # a reply's records "model.<partition>": the model the node evaluated
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


def partition_key(prefix: str, partition: int) -> str:
    """The key of ``partition``'s record of kind ``prefix`` (e.g. ``hyperprism.task.3``)."""
    return f"{prefix}.{partition}"


def by_partition(keys: Iterable[str], prefix: str) -> dict[int, str]:
    """{partition: key} of the keys ``partition_key(prefix, partition)`` among ``keys``."""
    start = prefix + "."
    return {int(key[len(start):]): key for key in keys
            if key.startswith(start) and key[len(start):].isdigit()}


def message_tasks(content: RecordDict) -> dict[int, NodeTask]:
    """The task of every partition a train message addresses."""
    records = content.config_records  # a view built on each access: take it once
    return {pid: record_task(records[key])
            for pid, key in by_partition(records, TASK_KEY).items()}


def message_models(content: RecordDict, prefix: str) -> dict[int, StateDict]:
    """The models of kind ``prefix`` (``NEIGHBOUR_PREFIX``, ``OWN_KEY``) in a message."""
    records = content.array_records  # a view built on each access: take it once
    return {pid: dict(records[key].to_torch_state_dict())
            for pid, key in by_partition(records, prefix.rstrip(".")).items()}


def reply_content(shared: Mapping[int, StateDict], metrics: Mapping[int, Mapping[str, float]],
                  models: Mapping[int, StateDict]) -> RecordDict:
    """A train reply's content: each partition's shared tensors and metrics, and the models
    in ``models`` (those the orchestrator asked for)."""
    content = RecordDict()
    for pid, tensors in shared.items():
        content[partition_key(SHARED_KEY, pid)] = ArrayRecord(tensors)
        content[partition_key(METRICS_KEY, pid)] = metric_record(metrics[pid])
    for pid, model in models.items():
        content[partition_key(MODEL_KEY, pid)] = ArrayRecord(model)
    return content
