"""A sweep file: the cells of one table or figure (methods x values of one key x seeds).

The sweep runner (``simulations.sweep``) runs them and the plots (``simulations.plots``) read
them; both import this module, not each other.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from flwr_hyperprism.setup.config import RunConfig, flat_defaults, load_settings
from flwr_hyperprism.setup.settings import config_key, settings_type
from strategies import algorithm_spec

REFERENCE_METHOD = "HyperPrism"  # the improvement row compares it with the best other method


@dataclass(frozen=True)
class Sweep:
    """A table or figure: methods (rows) x values of ``key`` (columns) x seeds."""

    name: str
    title: str
    key: str  # a setting of the run or of every method's algorithm
    values: tuple
    methods: Mapping[str, Mapping]  # method name -> RunConfig settings
    seeds: tuple[int, ...]
    base: RunConfig  # composed configs + overrides, for the configs' algorithm
    given: Mapping[str, Any] = field(default_factory=dict)  # every non-default setting given
    reuses: tuple[str, ...] = ()  # names of sweeps whose finished cells of the same settings
    # are this sweep's too (e.g. Table 3's base column is Table 2's)

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = (),
             seeds: Sequence[int] | None = None) -> Sweep:
        path = Path(path)
        spec = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path)))
        unknown = sorted(set(spec) - {"name", "title", "configs", "methods", "sweep", "seeds",
                                      "reuses"})
        if unknown:
            raise ValueError(f"unknown keys {unknown} in sweep file {path}; valid: name, title, "
                             f"configs, methods, sweep, seeds, reuses")
        if len(spec.get("sweep", {})) != 1:
            raise ValueError(f"sweep file {path}: 'sweep' must name exactly one config key and "
                             f"its values, e.g. sweep: {{alpha: [0.1, 1.0, 10.0]}}")
        if not isinstance(spec.get("reuses", []), list):
            raise ValueError(f"sweep file {path}: 'reuses' must be a list of sweep files, e.g. "
                             f"reuses: [table2_alpha.yaml]; got {spec['reuses']!r}")
        [(key, values)] = spec["sweep"].items()
        key = key.replace("-", "_")
        methods = {name: {k.replace("-", "_"): v for k, v in (settings or {}).items()}
                   for name, settings in spec["methods"].items()}
        loaded = load_settings([path.parent / c for c in spec.get("configs", [])], overrides)
        defaults = flat_defaults()
        given = {k: v for k, v in loaded.items() if v != defaults[config_key(k)]}
        base = RunConfig.build(**_own(loaded["algorithm"], given))
        sweep = cls(_name(spec, path), spec.get("title", path.stem), key,
                    tuple(values), methods, tuple(seeds or spec.get("seeds", [0])), base, given,
                    tuple(_sweep_name(path.parent / file) for file in spec.get("reuses", [])))
        cells = sweep.cells()  # every cell's config must be valid up front
        for cell in cells:
            algorithm_spec(cell.config.algorithm)
        unused = sorted(set(given) - {name for cell in cells
                                      for name in _own(cell.config.algorithm, given)})
        if unused:
            warnings.warn(f"settings {', '.join(unused)} belong to no algorithm of sweep "
                          f"{path}: they have no effect", stacklevel=2)
        return sweep

    def algorithm(self, method: str) -> str:
        """The algorithm of row ``method``: its own, or the configs'."""
        return str(self.methods[method].get("algorithm", self.base.algorithm))

    def cells(self) -> list[Cell]:
        """Every run: the base, the settings given for its method's algorithm (a sweep's
        ``smoothness=50`` reaches its Mudag and ADOM+ rows), the method's, the value, the
        seed."""
        cells = []
        for method, settings in self.methods.items():
            given = _own(self.algorithm(method), self.given)
            cells += [Cell(method, value, seed, self.base.replace(
                          **{**given, **settings, self.key: value, "seed": seed}))
                      for value in self.values for seed in self.seeds]
        return cells

    def selected(self, methods: Sequence[str] = (), values: Sequence[str] = (),
                 seeds: Sequence[int] = ()) -> list[Cell]:
        """The cells of rows ``methods`` at columns ``values`` (each as written on a command
        line, e.g. ``"0.1"``) and ``seeds``; an empty selection means all of them."""
        columns = {str(value): value for value in self.values}
        _require_known("methods", methods, self.methods,
                       f"rows of sweep {self.name}; its rows: {list(self.methods)}")
        _require_known("values", values, columns,
                       f"columns of sweep {self.name}; its {self.key} values: {list(columns)}")
        _require_known("seeds", seeds, self.seeds,
                       f"seeds of sweep {self.name}: {list(self.seeds)}")
        chosen = {columns[text] for text in values}
        return [cell for cell in self.cells() if (not methods or cell.method in methods)
                and (not values or cell.value in chosen) and (not seeds or cell.seed in seeds)]

    def with_seeds(self, seeds: Sequence[int]) -> Sweep:
        """This sweep with ``seeds`` added after its own (those it has already are kept once)."""
        return replace(self, seeds=tuple(dict.fromkeys((*self.seeds, *seeds))))


def _require_known(kind: str, given: Iterable[Any], known: Iterable[Any], what: str) -> None:
    """Raise a ValueError "<kind> [the unknown ones] are not <what>" when some of ``given``
    are not in ``known``."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{kind} {unknown} are not {what}")


def _sweep_name(path: Path) -> str:
    """The name of the sweep in file ``path`` (its ``name``, else the file's stem)."""
    if not path.is_file():
        raise ValueError(f"reuses: no sweep file {path}; name sweep files beside this one, "
                         f"e.g. reuses: [table2_alpha.yaml]")
    return _name(cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path))), path)


def _name(spec: Mapping[str, Any], path: Path) -> str:
    """A sweep's name: the ``name`` of its file's contents ``spec``, else the file's stem."""
    return str(spec.get("name", path.stem))


def _own(algorithm: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Those of ``settings`` that ``algorithm``'s config has: the run's and its own."""
    names = {f.name for f in (*RunConfig.setting_fields(),
                              *settings_type(algorithm).setting_fields())}
    return {k: v for k, v in settings.items() if k in names}


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
