"""A sweep file: the cells of one table or figure (methods x values of one key x seeds).

The sweep runner (``simulations.sweep``) runs them and the plots (``simulations.plots``) read
them; both import this module, not each other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from flwr_hyperprism.setup.config import RunConfig, load_config
from strategies import algorithm_spec

REFERENCE_METHOD = "HyperPrism"  # the improvement row compares it with the best other method


@dataclass(frozen=True)
class Sweep:
    """A table or figure: methods (rows) x values of ``key`` (columns) x seeds."""

    name: str
    title: str
    key: str  # a RunConfig field
    values: tuple
    methods: Mapping[str, Mapping]  # method name -> RunConfig settings
    seeds: tuple[int, ...]
    base: RunConfig  # composed configs + overrides

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = (),
             seeds: Sequence[int] | None = None) -> Sweep:
        path = Path(path)
        spec = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path)))
        unknown = sorted(set(spec) - {"name", "title", "configs", "methods", "sweep", "seeds"})
        if unknown:
            raise ValueError(f"unknown keys {unknown} in sweep file {path}; valid: name, title, "
                             f"configs, methods, sweep, seeds")
        if len(spec.get("sweep", {})) != 1:
            raise ValueError(f"sweep file {path}: 'sweep' must name exactly one config key and "
                             f"its values, e.g. sweep: {{alpha: [0.1, 1.0, 10.0]}}")
        [(key, values)] = spec["sweep"].items()
        key = key.replace("-", "_")
        methods = {name: {k.replace("-", "_"): v for k, v in (settings or {}).items()}
                   for name, settings in spec["methods"].items()}
        base = load_config([path.parent / c for c in spec.get("configs", [])], overrides)
        for settings in methods.values():  # every cell's config must be valid up front
            for value in values:
                algorithm_spec(base.replace(**{**settings, key: value}).algorithm)
        return cls(spec.get("name", path.stem), spec.get("title", path.stem), key,
                   tuple(values), methods, tuple(seeds or spec.get("seeds", [0])), base)

    def cells(self) -> list[Cell]:
        return [Cell(method, value, seed,
                     self.base.replace(**{**settings, self.key: value, "seed": seed}))
                for method, settings in self.methods.items() for value in self.values
                for seed in self.seeds]


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a method at one value of the swept key, with one seed."""

    method: str
    value: object
    seed: int
    config: RunConfig

    def id(self, key: str) -> str:
        return f"{file_name(self.method)}__{key}={self.value}__seed{self.seed}"


def file_name(text: str) -> str:
    """``text`` with every character but letters, digits, '-' and '.' replaced by '_'."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def cell_rows(out: Path, sweep: Sweep, cell: Cell) -> list[dict]:
    path = out / "cells" / cell.id(sweep.key) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
