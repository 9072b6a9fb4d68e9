"""The message protocol between the orchestrator and the nodes: keys and record encodings.

Every key a message carries is defined here, once; the Flower strategy, the apps, plug-in mode
and its mod read them from this module.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from .rule import NodeTask

NEIGHBOUR_PREFIX = "nbr."  # message records "nbr.<partition id>" carry neighbours' models
TASK_KEY = "hyperprism.task"  # the NodeTask record of a train message
RUN_KEY = "hyperprism.run"  # the run config record of a train message
INFO_KEY = "hyperprism.info"  # marks a request for the node's partition id
OWN_KEY = "hyperprism.own"  # the partition's own latest routed model, for a node without state
SESSION_KEY = "hyperprism.session"  # {"run-key": ...}: names the run's node checkpoints
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
    coefficients = {k[len("coef."):]: float(v) for k, v in record.items()
                    if k.startswith("coef.")}
    return NodeTask(int(record["round"]), tuple(int(n) for n in record["neighbours"]),
                    tuple(float(w) for w in record["weights"]), float(record["self-weight"]),
                    bool(record["train"]), coefficients, int(record["stage"]))
