"""Seeds derived from integer keys (run seed, partition id, round): every random draw of a run
is a pure function of where it happens, so runs replay and resume exactly."""

from __future__ import annotations

import numpy as np


def round_rng(*keys: int) -> np.random.Generator:
    """A NumPy generator determined by integer keys (e.g. seed, partition id, round)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def round_seed(*keys: int) -> int:
    """A 63-bit integer seed determined by integer keys, for torch generators."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))
