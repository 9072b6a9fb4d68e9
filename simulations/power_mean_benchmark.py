"""Benchmark: the weighted power mean (WPM) merge vs plain weighted averaging.

    python -m simulations.power_mean_benchmark [--k 8] [--n 1000000] [--p 7.37] [--repeats 30]

Prints the median time of each over ``repeats`` runs on k stacked float32 models of n
parameters, and their ratios against two weighted averages: one BLAS matrix-vector product over
the stacked models (the fastest there is), and the per-model sum ``sum_j a_j * x_j`` that
state-dict averaging code usually does. A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from flwr_hyperprism.math.mirror import power_mean


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=8, help="stacked models")
    parser.add_argument("--n", type=int, default=1_000_000, help="parameters per model")
    parser.add_argument("--p", type=float, nargs="+", default=[7.37, 9.0, 15.0],
                        help="power degrees")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.k, args.n, generator=gen) * 0.05
    weights = torch.rand(args.k, generator=gen)
    weights /= weights.sum()
    print(f"k={args.k} models x n={args.n:,} float32 parameters, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.no_grad():
        gemv = median_seconds(lambda: torch.mv(x.T, weights), args.repeats)
        loop = median_seconds(lambda: sum(w * m for w, m in zip(weights, x)), args.repeats)
        print(f"weighted average, one gemv:        {gemv * 1e3:8.2f} ms")
        print(f"weighted average, sum_j a_j x_j:   {loop * 1e3:8.2f} ms")
        for p in args.p:
            wpm = median_seconds(partial(power_mean, x, weights, p), args.repeats)
            print(f"power mean, p = {p:<6}:            {wpm * 1e3:8.2f} ms   ratio "
                  f"{wpm / gemv:5.2f} vs gemv, {wpm / loop:5.2f} vs sum")


if __name__ == "__main__":
    main()
