"""ClientApp: train and evaluate with the node's own (personal) head; one line changed."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from advanced_pytorch.task import HEAD, Net, load_partition
from advanced_pytorch.task import test as test_fn
from advanced_pytorch.task import train as train_fn
from flwr_hyperprism import hyperprism_mod

app = ClientApp(mods=[hyperprism_mod])


def personal_model(msg: Message, context: Context) -> Net:
    """The received model with this node's own head, once it has one (FedPer)."""
    model = Net()
    state = msg.content["arrays"].to_torch_state_dict()
    if "personal-head" in context.state:
        state.update(context.state["personal-head"].to_torch_state_dict())
    model.load_state_dict(state)
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = personal_model(msg, context)
    loader, _ = load_partition(int(context.node_config["partition-id"]),
                               int(context.node_config["num-partitions"]))
    lr = float(msg.content["config"]["lr"])
    loss = train_fn(model, loader, int(context.run_config["local-epochs"]), lr,
                    float(context.run_config["momentum"]))
    context.state["personal-head"] = ArrayRecord(
        {k: v for k, v in model.state_dict().items() if k.startswith(HEAD)})
    metrics = MetricRecord({"train_loss": loss, "lr": lr, "num-examples": len(loader.dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = personal_model(msg, context)
    _, loader = load_partition(int(context.node_config["partition-id"]),
                               int(context.node_config["num-partitions"]))
    loss, accuracy = test_fn(model, loader)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy,
                            "num-examples": len(loader.dataset)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
