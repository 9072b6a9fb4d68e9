"""The app every fleet scenario runs, copied and built once per session."""

from __future__ import annotations

import pytest

from tests.fleet import REPO, BuiltApp
from tests.local_flower import build_fab, offline_env


@pytest.fixture(scope="session")
def built_app(tmp_path_factory: pytest.TempPathFactory) -> BuiltApp:
    workdir = tmp_path_factory.mktemp("built-app")
    fab = build_fab(REPO, workdir, offline_env(workdir / "build-home"))
    return BuiltApp(source=workdir / "hyperprism", fab=fab)
