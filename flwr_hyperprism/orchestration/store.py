"""The run store: a run's outputs (config.json, metrics.jsonl, summary.json) and the
orchestrator's checkpoint (``routing.pt``), from which ``resume=true`` continues a run.

Files are written to a temporary name and renamed, so a process killed mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from uuid import uuid4

import torch

from flwr_hyperprism.setup.config import RunConfig
from strategies.base.checkpoint import save_atomically
from strategies.base.rule import StateDict

from .metrics import Row, RunRecorder, format_round

log = logging.getLogger("flwr")

ROUTING_FILE = "routing.pt"
# Settings a resumed run may change: they do not change what the nodes compute.
RESUMABLE_CHANGES = ("resume", "round_timeout", "node_wait_timeout", "output_dir", "state_dir")


@dataclass
class RoutingCheckpoint:
    """The orchestrator's state after a round-trip.

    Attributes
    ----------
    run_key : the run's identity for node checkpoints, ``<run name>-<8 hex digits>``
    next_exchange : index, in the strategy's ``schedule()``, of the round-trip to run next
    rows : metrics rows recorded so far (metrics.jsonl is cut back to them on resume)
    latest : partition id -> its latest shared tensors (what neighbours are sent)
    received : partition id -> the round its ``latest`` tensors come from (0: the initial model)
    dropped : partition id -> neighbours dropped in stages > 0 not yet reported in a row
    config : the run config (kebab-case keys), to refuse resuming with other settings
    """

    run_key: str
    next_exchange: int = 0
    rows: int = 0
    latest: dict[int, StateDict] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    dropped: dict[int, float] = field(default_factory=dict)
    config: dict[str, bool | int | float | str] = field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        save_atomically(asdict(self), Path(run_dir) / ROUTING_FILE)

    @classmethod
    def load(cls, run_dir: Path) -> RoutingCheckpoint | None:
        """The checkpoint in ``run_dir``, or None if there is none."""
        path = Path(run_dir) / ROUTING_FILE
        if not path.is_file():
            return None
        return cls(**torch.load(path, weights_only=True))


class RunStore:
    """A run's outputs and checkpoint in ``run_dir`` (None: log the rows, write nothing).

    Attributes
    ----------
    run_key : names the nodes' checkpoints of this run, ``<run name>-<8 hex digits>``
    recorder : writes the rows (None without a run directory)
    """

    def __init__(self, run_dir: str | Path | None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_key = ""
        self.recorder: RunRecorder | None = None

    @property
    def rows(self) -> list[Row]:
        """The rows recorded so far (a resumed run's kept rows included)."""
        return list(self.recorder.rows) if self.recorder is not None else []

    def open(self, config: RunConfig, description: str, settings: Mapping[str, object]
             ) -> RoutingCheckpoint | None:
        """Open the run's outputs; with ``resume``, return the checkpoint to continue from.

        A run directory that already holds rows is never overwritten: without ``resume``
        that is an error, as is resuming with other settings. ``settings``: what config.json
        says about the run.
        """
        checkpoint = None
        if config.resume:
            if self.run_dir is None:
                raise ValueError("resume=true needs a run directory (output-dir/run-name) "
                                 "to resume from")
            checkpoint = RoutingCheckpoint.load(self.run_dir)
            if checkpoint is None:
                log.warning("resume=true, but %s holds no routing checkpoint: starting at "
                            "round 0", self.run_dir)
        if checkpoint is None:
            self.run_key = f"{self.run_dir.name if self.run_dir else 'run'}-{uuid4().hex[:8]}"
        else:
            assert self.run_dir is not None  # only a resumed run has a checkpoint
            check_resumable(checkpoint.config, config, self.run_dir)
            self.run_key = checkpoint.run_key
            log.info("resuming %s after %s of its round-trips (%s rows)", self.run_dir,
                     checkpoint.next_exchange, checkpoint.rows)
        if self.run_dir is not None:
            self.recorder = RunRecorder(self.run_dir, config, description,
                                        keep_rows=checkpoint.rows if checkpoint else None,
                                        settings=settings)
        return checkpoint

    def save(self, next_exchange: int, latest: Mapping[int, StateDict],
             received: Mapping[int, int], dropped: Mapping[int, float],
             config: RunConfig) -> None:
        """Write the routing checkpoint (with a run directory only)."""
        if self.run_dir is None or self.recorder is None:
            return
        RoutingCheckpoint(self.run_key, next_exchange, len(self.recorder.rows), dict(latest),
                          dict(received), dict(dropped), config.to_run_config()
                          ).save(self.run_dir)

    def record(self, algorithm: str, row: Row, num_rounds: int) -> None:
        """Log one metrics row and append it, naming the algorithm, to the run's files."""
        log.info("[%s] %s", algorithm, format_round(row, num_rounds))
        if self.recorder is not None:
            self.recorder.record({"algorithm": algorithm, **row})

    def final_models_nonfinite(self, partitions: list[int]) -> None:
        """Mark the run not complete: these partitions' final models are not finite."""
        if self.recorder is not None:
            self.recorder.final_models_nonfinite(partitions)


def check_resumable(saved: Mapping[str, object], config: RunConfig, run_dir: Path) -> None:
    """Raise ValueError naming the settings that differ from the checkpointed run's."""
    current = config.to_run_config()
    allowed = {key.replace("_", "-") for key in RESUMABLE_CHANGES}
    # the saved run's other keys are other algorithms' settings (the algorithm is compared)
    changed = sorted(key for key in current
                     if key not in allowed and saved.get(key) != current[key])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {run_dir} with other settings ({detail}); resume "
                         f"with the run's own settings or start a new run-name")
