"""ServerApp: FedAvg replaced by the decentralized HyperPrism orchestrator."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from flwr_hyperprism import decentralized_strategy
from quickstart_pytorch.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config["num-server-rounds"])
    lr = float(context.run_config["lr"])

    arrays = ArrayRecord(Net().state_dict())
    strategy = decentralized_strategy("hyperprism", accuracy_metric="eval_acc",
                                      loss_metric="eval_loss")
    result = strategy.start(grid=grid, initial_arrays=arrays,
                            train_config=ConfigRecord({"lr": lr}), num_rounds=num_rounds)
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
