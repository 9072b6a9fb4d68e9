"""ServerApp: decentralized HyperPrism with central evaluation of every node's model, the best
model and results.json kept each round, a learning-rate schedule and personal heads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from advanced_pytorch.task import HEAD, Net, central_test_set
from advanced_pytorch.task import test as test_fn
from flwr_hyperprism import decentralized_strategy

app = ServerApp()


class RunLog:
    """Per round: results.json, and the best model so far by central accuracy."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.results, self.best = out_dir, [], -1.0

    def __call__(self, row: dict, models: dict[int, ArrayRecord]) -> None:
        self.results.append({"round": row["round"], "accuracy": row["accuracy_mean"],
                             "central_accuracy": row.get("server_accuracy_mean")})
        (self.out_dir / "results.json").write_text(json.dumps(self.results, indent=2))
        scores = row.get("server_accuracy", {})  # {partition id: accuracy}
        if models and scores:
            partition, accuracy = max(scores.items(), key=lambda item: item[1])
            if accuracy > self.best:
                self.best = accuracy
                torch.save(models[int(partition)].to_torch_state_dict(),
                           self.out_dir / "best_model.pt")


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config["num-server-rounds"])
    lr = float(context.run_config["lr"])
    decay_round = int(context.run_config["lr-decay-round"])
    test_loader = central_test_set()
    torch.manual_seed(int(context.run_config["seed"]))  # the initial model

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test_fn(model, test_loader)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy = decentralized_strategy(
        "hyperprism", p_mode=str(context.run_config["p-mode"]),
        fixed_p=float(context.run_config["fixed-p"]), local_layers=f"{HEAD}*",
        accuracy_metric="eval_acc", loss_metric="eval_loss",
        server_eval_every=int(context.run_config["evaluate-every"]),
        train_config_fn=lambda r: ConfigRecord({"lr": lr if r < decay_round else lr / 2}))
    strategy.on_round = RunLog(strategy.run_dir)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            train_config=ConfigRecord({"lr": lr}), num_rounds=num_rounds,
                            evaluate_fn=central_evaluate)
    torch.save(result.arrays.to_torch_state_dict(), strategy.run_dir / "final_model.pt")
