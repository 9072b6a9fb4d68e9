"""The settings the accelerated baselines (Mudag, ADOM+) share: L and mu of the local losses."""

from __future__ import annotations

from dataclasses import dataclass

from flwr_hyperprism.setup.settings import AlgorithmSettings


@dataclass(frozen=True)
class AcceleratedSettings(AlgorithmSettings):
    """Smoothness L and strong convexity mu of the local losses (kappa = L / mu = 10)."""

    smoothness: float = 100.0  # L = 1 / lr
    strong_convexity: float = 10.0  # mu

    def validate(self) -> None:
        self.require_positive(("smoothness", "strong_convexity"))
        if self.strong_convexity > self.smoothness:
            raise ValueError(f"config key 'strong-convexity' (mu = {self.strong_convexity!r}) "
                             f"must not exceed 'smoothness' (L = {self.smoothness!r}): the "
                             f"condition number L / mu is >= 1")
