"""GPU check: the same few CNN rounds on the CPU and on a GPU, metrics compared, times printed.

    python -m simulations.gpu_check                       # LeNet, synthetic data, 6 nodes
    python -m simulations.gpu_check --model cnn --dataset fashion-mnist --data-dir ../shared/data

Runs every algorithm in-process (HyperPrism twice: learned degrees and the paper's
hypernetwork, so the hypernetwork's own training runs on the device too) with ``device=cpu``
node after node (``node-batching=false``, the reference) and then ``device=<against>``
(default ``cuda``) as one batched node group (``strategies.base.group``: local SGD and
evaluation over stacked parameters), after one untimed warm-up round on the device (CUDA's
start-up is not a node-round). Prints each round's mean accuracy and loss on both (and
HyperPrism's p_theta) and the seconds per node-round; exits 0 when every round's mean accuracy
agrees within ``--tolerance`` (absolute) and the mean loss within the same relative
tolerance, 1 when they do not, 2 when the machine has no such device (nothing was run on it;
2 is also argparse's code for bad arguments, which it names).

A learned degree moves by a whole step on the sign of a slope, so float noise near a zero
slope can send the two runs' degrees apart: on a mismatch of HyperPrism alone, compare the p
columns before suspecting the device code.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flwr_hyperprism.orchestration.in_process import run_in_process
from flwr_hyperprism.orchestration.rounds import round_loop
from flwr_hyperprism.setup.config import RunConfig
from strategies import ALGORITHMS
from strategies.base.learner import resolve_device

# name -> RunConfig settings: every registered algorithm, and HyperPrism with both p-modes
VARIANTS: dict[str, dict[str, Any]] = {
    "hyperprism": {"algorithm": "hyperprism", "p_mode": "tracking"},
    "hyperprism-hypernetwork": {"algorithm": "hyperprism", "p_mode": "hypernetwork"},
    **{name: {"algorithm": name} for name in sorted(ALGORITHMS) if name != "hyperprism"},
    "mudag": {"algorithm": "mudag", "mudag_max_gossip": 2},  # a short check
}


def timed_run(config: RunConfig) -> tuple[list[dict], float]:
    """The run's metrics rows and its seconds per node-round."""
    started = time.perf_counter()
    rows = run_in_process(round_loop(config))
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


def print_rounds(cpu: Sequence[Mapping], other: Sequence[Mapping]) -> None:
    """Both runs' mean accuracy and loss per round, side by side (and p_theta where the
    rows have it)."""
    degrees = "p_theta_mean" in cpu[0]
    print("  round  acc(cpu) acc(other)  loss(cpu) loss(other)"
          + ("  p(cpu) p(other)" if degrees else ""))
    for a, b in zip(cpu, other):
        line = (f"  {a['round']:5d}  {a['accuracy_mean']:8.4f} {b['accuracy_mean']:10.4f}  "
                f"{a['loss_mean']:9.4f} {b['loss_mean']:11.4f}")
        if degrees:
            line += f"  {a['p_theta_mean']:6.2f} {b['p_theta_mean']:8.2f}"
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet", choices=("lenet", "cnn"))
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=0,
                        help="SGD steps per round-trip (default: one local epoch)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--against", default="cuda", help="the device to compare with the CPU")
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args(argv)
    variants = list(dict.fromkeys(args.variants.split(",")))  # each once
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        device = resolve_device(args.against)
    except ValueError as err:
        print(f"no {args.against} device here, nothing run on it: {err}")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} on {args.dataset}, {args.nodes} nodes, {args.rounds} rounds; "
          f"cpu node after node vs {device} ({name}) batched; tolerance {args.tolerance}")
    failed = []
    with tempfile.TemporaryDirectory() as out:
        base = RunConfig(model=args.model, dataset=args.dataset,
                         data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else "",
                         num_nodes=args.nodes, num_rounds=args.rounds, eval_size=1000,
                         local_steps=args.local_steps, output_dir=out)
        timed_run(base.replace(num_rounds=1, device=args.against, run_name="warm-up"))
        for variant in variants:
            (cpu, cpu_seconds), (other, other_seconds) = (
                timed_run(base.replace(**VARIANTS[variant], device=device_name,
                                       node_batching=batched, run_name=f"{variant}-{index}"))
                for index, (device_name, batched) in enumerate((("cpu", False),
                                                                (args.against, True))))
            problems = compare(cpu, other, args.tolerance)
            print(f"{variant}: seconds per node-round: cpu {cpu_seconds:.3f}, "
                  f"{args.against} {other_seconds:.3f}; {'OK' if not problems else 'MISMATCH'}")
            print_rounds(cpu, other)
            for problem in problems:
                print(f"  outside the tolerance: {problem}")
            if problems:
                failed.append(variant)
    print("OK" if not failed else f"MISMATCH: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
