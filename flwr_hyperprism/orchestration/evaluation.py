"""Server-side evaluation and the run's ``Result``: there is no global model, so a Strategy's
``evaluate_fn`` scores each node's model of the round, and ``result.arrays`` is the average of
the nodes' finite final models (reported, never routed to a node)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from flwr_hyperprism.math.seeding import round_rng
from flwr_hyperprism.messages.protocol import scalar_metrics
from flwr_hyperprism.setup.config import RunConfig
from strategies.base.screening import nonfinite_fault

from .metrics import Row
from .routing import as_state_dict
from .store import RunStore

log = logging.getLogger("flwr")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
"""``evaluate_fn(round, arrays)``: a Strategy.start evaluate_fn, here of one node's model."""


def server_eval_partitions(config: RunConfig) -> set[int]:
    """The partitions ``evaluate_fn`` scores (when they report a model): all, or the same
    seeded sample of ``server-eval-nodes`` partitions every round."""
    wanted, num_nodes = config.server_eval_nodes, config.num_nodes
    if wanted == 0 or wanted >= num_nodes:
        return set(range(num_nodes))
    sample = round_rng(config.seed, 0, 0x5E).choice(num_nodes, wanted, replace=False)
    return {int(pid) for pid in sample}


def reports_models(config: RunConfig, round_: int, stage: int, wants_models: bool) -> bool:
    """Whether the nodes send their evaluated models in round-trip (``round_``, ``stage``):
    after the last round (the final models), and every ``server-eval-every`` rounds when
    an ``evaluate_fn`` or ``on_round`` wants them."""
    return stage == 0 and (round_ == config.num_rounds + 1 or wants_models
                           and (round_ - 1) % config.server_eval_every == 0)


def score_on_server(evaluate_fn: EvaluateFn, round_: int, reported: Mapping[int, ArrayRecord],
                    partitions: set[int], node_metrics: dict[int, dict[str, float]]) -> None:
    """Add ``evaluate_fn``'s metrics of each reported model (of ``partitions``) to that
    node's metrics as ``server_<name>``; ``round_`` is the round the models are from."""
    for pid in sorted(set(reported) & partitions):
        scored = evaluate_fn(round_, reported[pid])
        if scored is not None and pid in node_metrics:
            node_metrics[pid].update((f"server_{k}", v) for k, v in scalar_metrics(scored).items())


def network_average(models: Mapping[int, ArrayRecord]) -> ArrayRecord:
    """The mean of the nodes' models: floating-point tensors averaged (in float64, cast
    back), the others (e.g. BatchNorm's counters) taken from the lowest partition id."""
    states = [models[pid].to_torch_state_dict() for pid in sorted(models)]
    mean = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = torch.stack([s[key].double() for s in states]).mean(dim=0)
            mean[key] = total.to(first.dtype)
        else:
            mean[key] = first
    return ArrayRecord(mean)


def finite_average(final_models: Mapping[int, ArrayRecord], store: RunStore) -> ArrayRecord:
    """The network average of the finite final models (``result.arrays``); a partition
    whose final model is not finite is left out with a warning and makes the run not
    ``complete`` in summary.json. Empty when no final model is finite."""
    nonfinite = sorted(pid for pid, model in final_models.items()
                       if nonfinite_fault(as_state_dict(model)) is not None)
    if nonfinite:
        log.warning("the final models of partitions %s are not finite: result.arrays "
                    "averages the other %s", nonfinite, len(final_models) - len(nonfinite))
        store.final_models_nonfinite(nonfinite)
    finite = {pid: m for pid, m in final_models.items() if pid not in nonfinite}
    if final_models and not finite:
        log.error("no final model is finite: result.arrays is empty")
    return network_average(finite) if finite else ArrayRecord()


def flat_metrics(row: Mapping[str, Any]) -> MetricRecord:
    """A metrics row as a MetricRecord: per-node dicts become ``<key>.<partition>``."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{pid}": v for pid, v in value.items()})
        elif not isinstance(value, str):
            flat[key] = value
    return MetricRecord(flat)


def run_result(rows: list[Row], arrays: ArrayRecord) -> Result:
    """``Strategy.start``'s Result: each round's aggregates as ``train_metrics_clientapp``
    (per-node values as ``<key>.<partition>``), the means of the server's scores as
    ``evaluate_metrics_serverapp``, and ``arrays``."""
    result = Result()
    for row in rows:
        result.train_metrics_clientapp[row["round"]] = flat_metrics(row)
        server = {k[len("server_"):-len("_mean")]: v for k, v in row.items()
                  if k.startswith("server_") and k.endswith("_mean")}
        if server:
            result.evaluate_metrics_serverapp[row["round"]] = MetricRecord(server)
    result.arrays = arrays
    return result
