"""D-PSGD on fluke-fl 0.8.1's decentralized API: a peer baseline for side-by-side timing.

Run it with fluke's own interpreter (fluke-fl is never a dependency of this project):

    fluke-venv/bin/python simulations/peers/fluke_dpsgd.py \
        --data-dir /abs/path/to/data --partition /tmp/part.npz --mixing /tmp/mixing.npz \
        --nodes 10 --rounds 2 --lr 0.01 --batch-size 128 --seed 0 --out /tmp/fluke.jsonl

``python -m simulations.engine_benchmark`` writes both files from the project's own partition
and graphs and runs it.

It imports neither flwr nor flwr_hyperprism.

Workload: multinomial logistic regression on MNIST (one zero-initialised ``nn.Linear(784, 10)``
behind a Flatten, cross-entropy on the logits), N nodes holding the per-node index arrays of
``--partition`` (an .npz whose keys "0".."N-1" index the 60k MNIST training set), each round's
mixing matrix from ``--mixing`` (an .npz whose keys "1".."R" hold the project's Erdos-Renyi
graph of that round with its Metropolis-Hastings weights: the very same graphs),
plain SGD (no momentum, no weight decay), one local epoch per round, adapt-then-combine
(train, then average with the neighbours), and every node's model scored on the full 10k MNIST
test set after every round.

Output (JSON lines in ``--out``): one line per round
``{"round", "seconds", "accuracy", "loss"}`` (seconds: wall time of the round, local training,
model exchange, mixing and evaluation; accuracy and loss: the means over the N nodes), then
``{"total_seconds", "peak_rss_bytes"}`` (total: wall time of the whole script from its first
line, imports and data loading included; peak RSS: the larger of the ``ru_maxrss`` of this
process and of its waited-for children, from ``resource.getrusage``; see ``peak_rss_bytes``).

Two options beyond the workload's: ``--device`` (fluke's device string, default cpu) and
``--threads`` (torch intra-op threads, default 1 like the project's engine, which runs every
node's arithmetic single-threaded; 0 keeps torch's default). On a 2-core machine shared with
other work, torch's default 2 threads made one SGD step of this model 30-60x slower (20-48 ms
instead of 0.7 ms, measured), so timings are only comparable with equal thread settings.

What is fluke's and what this script adds
-----------------------------------------
fluke 0.8.1's decentralized package (``fluke.algorithms.decentralized``) offers the base
classes ``DecentralizedFL`` (a federation of clients joined by a ``Topology``, a wrapper around
a networkx graph, with no server) and ``AbstractDFLClient``, and one concrete algorithm,
``GossipDFL``/``GossipClient``: asynchronous push gossip, where each client trains and then
pushes its model to ONE random neighbour, which replaces its model by one received model (or
a plain average of them). fluke has no D-PSGD, no Metropolis-Hastings weights, no Erdos-Renyi
topology (``Topology.random`` is a random *regular* graph) and no time-varying graphs. So this
script subclasses fluke's public base classes exactly where D-PSGD differs:

fluke's (used unchanged):
  * data: ``fluke.data.datasets.Datasets.MNIST`` (loads the torchvision files, scales to
    [0, 1]), ``FastDataLoader`` (fluke's batching/shuffling loader) for every node's shard and
    the test set, ``DummyDataContainer`` + ``DataSplitter.assign`` (fluke's path for fixed
    client assignments), ``FlukeENV`` (seed, device, evaluation config, in-memory mode);
  * federation: ``DecentralizedFL.__init__`` builds the clients (``init_clients``: model
    copies, ``OptimizerConfigurator`` for SGD with a constant-lr ``StepLR``, loss from
    ``get_loss("CrossEntropyLoss")``), the ``Channel`` and the observers;
    ``DecentralizedFL._compute_evaluation`` evaluates every participating client on the test
    set and notifies observers (``server_evaluation``, eval_type "locals");
  * training: ``Client.local_update`` -> ``Client.fit`` (fluke's SGD loop over the
    ``FastDataLoader``), then ``send_model``;
  * communication: ``Channel.broadcast`` of a ``fluke.comm.Message`` (the channel deep-copies
    the model for every receiver) and ``Channel.receive_all``;
  * mixing arithmetic: ``fluke.utils.model.aggregate_models`` (weighted average, eta = 1);
  * evaluation: ``ClassificationEval.evaluate`` (fluke's torchmetrics-based evaluation loop);
  * topology: ``Topology`` wrapping each round's networkx graph.

added here:
  * ``DPSGDClient(AbstractDFLClient)``: ``local_update`` calls fluke's ``Client.local_update``
    directly (``AbstractDFLClient.local_update`` would skip training when no gossip message is
    waiting); ``receive_model`` is a no-op (adapt-then-combine takes nothing in before the
    local step); ``send_model`` broadcasts to all current neighbours; ``combine`` averages the
    received models with the Metropolis-Hastings row of the node; ``evaluate`` also passes the
    loss function to fluke's evaluator (``Client.evaluate`` leaves it out, so it reports no
    loss).
  * ``DPSGD(DecentralizedFL)``: ``run`` (a synchronous D-PSGD round: new graph and weights, all
    nodes adapt, all nodes combine, evaluate) in place of ``GossipDFL.run``; no rich progress
    bars and no ``finalize`` (which would evaluate every node once more after the last round).
  * each round's graph and weights read from ``--mixing`` (computed by the project's engine:
    the same graphs for both).
  * the model (fluke's ``nets.MNIST_LR`` puts a softmax before the cross-entropy and is randomly
    initialised, so it is not this workload's logistic regression), MNIST's usual normalisation
    (mean 0.1307, std 0.3081) applied to fluke's [0, 1] tensors once at load time, and the
    ``.npz`` partition (turned into per-node ``FastDataLoader`` s, as ``DataSplitter.assign``
    does for its own splits).
  * the evaluator is fluke's ``ClassificationEval`` restricted to accuracy (its default also
    computes six macro/micro precision/recall/F1 metrics that the workload does not report);
    the JSON-lines writer is a fluke ``FederationObserver``/``ServerObserver``.

Known differences from the workload as specified:
  * the test loss is fluke's: the mean of per-batch mean losses (10k = 78 x 128 + 16, so the
    last batch of 16 weighs as much as a full one), not the mean over the 10k examples;
    accuracy is exact (torchmetrics over all examples), rounded by fluke to 5 decimals.
  * the training loaders keep every example (``skip_singleton=False``); fluke's default drops
    a last batch of one example (meant for batch-norm models).
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # total_seconds counts imports and data loading too

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
from typing import Any, TextIO  # noqa: E402

import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from fluke import DDict, FlukeENV  # noqa: E402
from fluke.algorithms.decentralized import DecentralizedFL, Topology  # noqa: E402
from fluke.algorithms.decentralized.client import AbstractDFLClient  # noqa: E402
from fluke.client import Client  # noqa: E402
from fluke.comm import Message  # noqa: E402
from fluke.data import DataSplitter, DummyDataContainer, FastDataLoader  # noqa: E402
from fluke.data.datasets import Datasets  # noqa: E402
from fluke.evaluation import ClassificationEval, Evaluator  # noqa: E402
from fluke.utils import FederationObserver, ServerObserver  # noqa: E402
from fluke.utils.model import aggregate_models  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics import Accuracy  # noqa: E402

NUM_CLASSES = 10
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TEST_BATCH_SIZE = 128  # fluke's batch size for the server-side test loader (DataSplitter.assign)


# ---------------------------------------------------------------------------- mixing matrices
def load_mixing(path: str, num_nodes: int, rounds: int) -> list[np.ndarray]:
    """The mixing matrix of every round 1..rounds: an .npz whose key "<round>" is an
    (num_nodes, num_nodes) doubly stochastic matrix (its support is the round's graph)."""
    with np.load(path) as matrices:
        mixing = [np.asarray(matrices[str(r)], dtype=np.float64) for r in range(1, rounds + 1)]
    if any(m.shape != (num_nodes, num_nodes) for m in mixing):
        raise ValueError(f"{path}: every matrix must be {num_nodes} x {num_nodes}")
    return mixing


# ------------------------------------------------------------------------------ fluke subclasses
class DPSGDClient(AbstractDFLClient):
    """A D-PSGD node (adapt-then-combine) on fluke's decentralized client base class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixing_weights: dict[int, float] = {self.index: 1.0}

    def local_update(self, current_round: int) -> None:
        # fluke's standard local update (receive_model -> fit -> send_model), every round.
        Client.local_update(self, current_round)

    def receive_model(self) -> None:
        # Adapt-then-combine: nothing to take in before the local step (see combine).
        return None

    def send_model(self) -> None:
        if self.neighbours:
            self.channel.broadcast(
                Message(self.model, "model", self.index, inmemory=True), self.neighbours
            )

    def combine(self) -> None:
        """w_i <- a_ii w_i + sum_j a_ij w_j over the models received this round."""
        messages = self.channel.receive_all(self.index, msg_type="model")
        if not messages:
            return  # isolated node: a_ii = 1
        models = [self.model] + [msg.payload for msg in messages]
        weights = [self.mixing_weights[self.index]] + [
            self.mixing_weights[msg.sender] for msg in messages
        ]
        aggregate_models(self.model, models, weights, eta=1.0, inplace=True)

    def evaluate(self, evaluator: Evaluator, test_set: FastDataLoader) -> dict[str, float]:
        model = self.model
        if test_set is None or model is None:
            return {}
        return evaluator.evaluate(
            self._last_round,
            model,
            test_set,
            loss_fn=self.hyper_params.loss_fn,
            device=self.device,
        )


class DPSGD(DecentralizedFL):
    """Synchronous D-PSGD over a time-varying graph with given mixing matrices."""

    def __init__(self, *args: Any, mixing: list[np.ndarray], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixing = mixing

    def get_client_class(self) -> type[AbstractDFLClient]:
        return DPSGDClient

    def _set_round_graph(self, round_: int) -> None:
        weights = self.mixing[round_ - 1]
        graph = nx.Graph()
        graph.add_nodes_from(range(self.n_clients))
        graph.add_edges_from((i, j) for i, j in zip(*np.nonzero(np.triu(weights, 1))))
        self.topology = Topology(graph)
        for client in self.clients:
            i = client.index
            client.neighbours = self.topology[i]
            client.mixing_weights = {i: float(weights[i, i])}
            client.mixing_weights.update({j: float(weights[i, j]) for j in client.neighbours})

    def run(self, n_rounds: int, *args: Any, **kwargs: Any) -> None:
        for rnd in range(self.rounds, self.rounds + n_rounds):
            round_ = rnd + 1
            self.notify(event="start_round", round=round_, global_model=None)
            self._set_round_graph(round_)
            for client in self.clients:  # adapt: one local epoch, then send to neighbours
                client.local_update(round_)
                self._participants[round_].add(client.index)
            for client in self.clients:  # combine: MH-weighted average
                client.combine()
            self._compute_evaluation(round_)  # every node on the full test set
            self.notify(event="end_round", round=round_)
            self.rounds += 1
        self.notify(event="finished", round=self.rounds + 1)


class JsonlRecorder(FederationObserver, ServerObserver):
    """Writes one JSON line per round: wall seconds and mean node test accuracy and loss."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._start = 0.0
        self._evals: dict[int, dict[str, float]] = {}

    def start_round(self, round: int, global_model: Any) -> None:  # noqa: A002
        self._evals = {}
        self._start = time.perf_counter()

    def server_evaluation(self, round: int, eval_type: str, evals: dict, **kwargs: Any) -> None:  # noqa: A002
        if eval_type == "locals":
            self._evals = evals

    def end_round(self, round: int) -> None:  # noqa: A002
        seconds = time.perf_counter() - self._start
        accuracy = float(np.mean([e["accuracy"] for e in self._evals.values()]))
        loss = float(np.mean([e["loss"] for e in self._evals.values()]))
        line = {"round": round, "seconds": seconds, "accuracy": accuracy, "loss": loss}
        self.stream.write(json.dumps(line) + "\n")
        self.stream.flush()
        print(json.dumps(line), flush=True)


# ------------------------------------------------------------------------------------- workload
class LogisticRegression(nn.Module):
    """Flatten + one zero-initialised Linear(784, 10); cross-entropy is applied on the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(28 * 28, NUM_CLASSES)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.linear(self.flatten(x))
        return logits


def load_partition(path: str, num_nodes: int, train_size: int) -> list[np.ndarray]:
    with np.load(path) as archive:
        expected = {str(i) for i in range(num_nodes)}
        if set(archive.files) != expected:
            raise SystemExit(
                f"{path}: keys must be '0'..'{num_nodes - 1}' for --nodes {num_nodes}, "
                f"got {sorted(archive.files, key=lambda k: (len(k), k))}"
            )
        shards = [np.asarray(archive[str(i)], dtype=np.int64) for i in range(num_nodes)]
    for i, shard in enumerate(shards):
        if shard.size == 0:
            raise SystemExit(f"{path}: node {i} has no examples")
        if shard.min() < 0 or shard.max() >= train_size:
            raise SystemExit(f"{path}: node {i} has indices outside 0..{train_size - 1}")
    return shards


def build_splitter(data_dir: str, shards: list[np.ndarray], batch_size: int) -> DataSplitter:
    """fluke's MNIST container, normalised, cut into per-node FastDataLoaders by the partition."""
    mnist = Datasets.MNIST(path=data_dir)  # torchvision layout under data_dir/MNIST/raw
    x_train, y_train = mnist.train
    x_test, y_test = mnist.test
    x_train.sub_(MNIST_MEAN).div_(MNIST_STD)  # in place: no second copy of the images
    x_test.sub_(MNIST_MEAN).div_(MNIST_STD)
    clients_tr = [
        FastDataLoader(
            x_train[torch.from_numpy(idx)],
            y_train[torch.from_numpy(idx)],
            num_labels=NUM_CLASSES,
            batch_size=batch_size,
            shuffle=True,
            skip_singleton=False,
        )
        for idx in shards
    ]
    server_te = FastDataLoader(
        x_test, y_test, num_labels=NUM_CLASSES, batch_size=TEST_BATCH_SIZE, shuffle=False
    )
    container = DummyDataContainer(
        clients_tr=clients_tr,
        clients_te=[None] * len(shards),
        server_data=server_te,
        num_classes=NUM_CLASSES,
    )
    return DataSplitter(container)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/*-ubyte")
    parser.add_argument("--partition", required=True, help=".npz of per-node index arrays")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--mixing", required=True,
                        help=".npz of each round's mixing matrix (keys '1'..'rounds')")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON-lines output file")
    parser.add_argument("--device", default="cpu", help="fluke device: cpu, cuda, cuda:N, auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, as the project's engine does node arithmetic; "
        "0 keeps torch's default)",
    )
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be >= 2")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    return args


def peak_rss_bytes() -> int:
    # The larger of the two, not their sum: the only child is the ``ldconfig -p`` that
    # ``import torch`` (ctypes.util.find_library) starts with vfork, and a vfork child reports
    # the parent's RSS high-water mark at that moment (about 0.45 GB), so a sum would count the
    # interpreter twice. A real worker process would show up here too.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, children) * 1024)  # Linux reports KiB


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    env = FlukeENV()
    env.set_seed(args.seed)
    env.set_device(args.device)
    env.set_inmemory(True)
    env.set_eval_cfg(pre_fit=False, post_fit=False, locals=True, server=False)
    env.set_evaluator(
        ClassificationEval(
            eval_every=1,
            n_classes=NUM_CLASSES,
            accuracy=Accuracy(task="multiclass", num_classes=NUM_CLASSES, top_k=1),
        )
    )

    shards = load_partition(args.partition, args.nodes, train_size=60_000)
    splitter = build_splitter(args.data_dir, shards, args.batch_size)

    hyper_params = DDict(
        model=LogisticRegression(),
        client=DDict(
            batch_size=args.batch_size,  # unused by DummyDataContainer: the loaders carry it
            local_epochs=1,
            loss="CrossEntropyLoss",
            optimizer=DDict(name="SGD", lr=args.lr, momentum=0.0, weight_decay=0.0),
            scheduler=DDict(name="StepLR", step_size=1, gamma=1.0),
        ),
    )
    federation = DPSGD(
        n_clients=args.nodes,
        data_splitter=splitter,
        hyper_params=hyper_params,
        topology=Topology(nx.empty_graph(args.nodes)),  # replaced by G(1), G(2), ... in run
        mixing=load_mixing(args.mixing, args.nodes, args.rounds),
    )

    with open(args.out, "w", encoding="utf-8") as stream:
        federation.set_callbacks(JsonlRecorder(stream))
        federation.run(args.rounds)
        env.close_cache()
        final = {
            "total_seconds": time.perf_counter() - _T_START,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        stream.write(json.dumps(final) + "\n")
    print(json.dumps(final), flush=True)


if __name__ == "__main__":
    main()
