"""Flower ServerApp: builds the routing-only orchestrator from the run config and starts it."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from flwr_hyperprism.orchestration.metrics import default_run_dir
from flwr_hyperprism.server.strategy import make_strategy
from flwr_hyperprism.setup.config import RunConfig
from strategies.base import learner

log = logging.getLogger("flwr")


def initial_model(config: RunConfig) -> ArrayRecord:
    """The common initial model every node starts from (``learner.initial_model``)."""
    return ArrayRecord(learner.initial_model(config))


def run(grid: Grid, config: RunConfig) -> Result:
    """Run ``config.algorithm`` on the nodes behind ``grid``; outputs go to the run directory."""
    run_dir = default_run_dir(config)
    log.info("flwr-hyperprism: %s, outputs in %s", config.algorithm, run_dir)
    strategy = make_strategy(config, run_dir)
    return strategy.start(grid, initial_model(config))


def make_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp for ``config``, or for the run config Flower passes when it is None."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, config or RunConfig.from_run_config(context.run_config))

    return server_app


app = make_server_app()
