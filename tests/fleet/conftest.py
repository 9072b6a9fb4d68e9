"""The app every fleet scenario runs, copied and built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fleet import REPO
from tests.local_flower import build_fab, offline_env


@dataclass(frozen=True)
class BuiltApp:
    """The repo as `flwr run <repo>` ships it, and its FAB.

    Attributes
    ----------
    source : a copy of the files `flwr run` ships (`copy_app`): `flwr run <source>` runs what
        `flwr run <repo>` runs without walking the repo's .venv again (~5 s a run)
    fab : the .fab that `flwr build` makes of ``source``
    """

    source: Path
    fab: Path


@pytest.fixture(scope="session")
def built_app(tmp_path_factory: pytest.TempPathFactory) -> BuiltApp:
    workdir = tmp_path_factory.mktemp("built-app")
    fab = build_fab(REPO, workdir, offline_env(workdir / "build-home"))
    return BuiltApp(source=workdir / "hyperprism", fab=fab)
