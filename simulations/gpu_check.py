"""GPU check: the same few CNN rounds on the CPU and on a GPU, metrics compared, times printed.

    python -m simulations.gpu_check                       # LeNet, synthetic data, 6 nodes
    python -m simulations.gpu_check --model cnn --dataset fashion-mnist --data-dir ../shared/data

Runs HyperPrism (learned degrees) in-process with ``device=cpu`` and then ``device=<against>``
(default ``cuda``), prints each round's mean accuracy and loss on both and the seconds per
node-round, and exits 0 when every round's mean accuracy agrees within ``--tolerance``
(absolute) and the mean loss within the same relative tolerance; 1 when they do not; 2 when
the machine has no such device (nothing was run on it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from flwr_hyperprism.config import RunConfig
from strategies.decentralized import make_strategy, run_in_process
from strategies.learner import resolve_device


def timed_run(config: RunConfig) -> tuple[list[dict], float]:
    """The run's metrics rows and its seconds per node-round."""
    started = time.perf_counter()
    rows = run_in_process(make_strategy(config))
    seconds = time.perf_counter() - started
    return rows, seconds / (config.num_nodes * (config.num_rounds + 1))


def compare(cpu: Sequence[dict], other: Sequence[dict], tolerance: float) -> list[str]:
    """The rounds whose mean accuracy or loss differ by more than ``tolerance``."""
    problems = []
    for a, b in zip(cpu, other):
        if abs(a["accuracy_mean"] - b["accuracy_mean"]) > tolerance:
            problems.append(f"round {a['round']}: accuracy {a['accuracy_mean']:.4f} vs "
                            f"{b['accuracy_mean']:.4f}")
        if abs(a["loss_mean"] - b["loss_mean"]) > tolerance * max(abs(a["loss_mean"]), 1.0):
            problems.append(f"round {a['round']}: loss {a['loss_mean']:.4f} vs "
                            f"{b['loss_mean']:.4f}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet", choices=("lenet", "cnn"))
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", default="cuda", help="the device to compare with the CPU")
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        device = resolve_device(args.against)
    except ValueError as err:
        print(f"no {args.against} device here, nothing run on it: {err}")
        return 2
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory() as out:
        for name in ("cpu", args.against):
            config = RunConfig(model=args.model, dataset=args.dataset,
                               data_dir=str(Path(args.data_dir).resolve()) if args.data_dir
                               else "", num_nodes=args.nodes, num_rounds=args.rounds,
                               eval_size=1000, device=name, output_dir=out, run_name=name)
            rows[name], seconds[name] = timed_run(config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} on {args.dataset}, {args.nodes} nodes, {args.rounds} rounds; "
          f"cpu vs {device} ({name})")
    print("round  acc(cpu) acc(other)  loss(cpu) loss(other)")
    for a, b in zip(rows["cpu"], rows[args.against]):
        print(f"{a['round']:5d}  {a['accuracy_mean']:8.4f} {b['accuracy_mean']:10.4f}  "
              f"{a['loss_mean']:9.4f} {b['loss_mean']:11.4f}")
    print(f"seconds per node-round: cpu {seconds['cpu']:.3f}, {args.against} "
          f"{seconds[args.against]:.3f}")
    problems = compare(rows["cpu"], rows[args.against], args.tolerance)
    for problem in problems:
        print(f"outside the tolerance {args.tolerance}: {problem}")
    print("OK" if not problems else "MISMATCH")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
