"""Verifier throughput: pooled ``Verifier.verify_batch`` vs a one-by-one loop of single checks.

Reproduce (from the repository root, after `rlfr data download math500`, or with RLFR_BENCHMARK_DIR naming a
directory of local copies):

    .venv/bin/python benchmarks/verifier.py --n 400 --workers 1 2 4 --runs 3

Items: MATH-500 ground truths written as ``\\boxed{...}`` in a sentence, half checked against their own
answer (mostly decided by the in-process fast path) and half against another row's answer (mostly sent to
math-verify). "loop" is what ``rlfr.reward.verifier.verify`` does: one check at a time on a pool. For each
setting one pool is started and given one untimed pass over the items (it starts every worker and fills
math-verify's parse caches, as in RL where each ground truth is checked G times per step); then
``--runs`` timed passes follow and the median rate (checks per second) is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from rlfr.data import load_benchmark
from rlfr.reward.verifier import Verifier


def items(n: int) -> tuple[list[str], list]:
    rows = load_benchmark("math500")
    half = min(n // 2, len(rows))
    completions, answers = [], []
    for i in range(half):
        gold = rows[i].answer if isinstance(rows[i].answer, str) else rows[i].answer[0]
        completions.append(f"Thus the answer is $\\boxed{{{gold}}}$.")
        answers.append(rows[i].answer)
        completions.append(f"Thus the answer is $\\boxed{{{gold}}}$.")
        answers.append(rows[(i + 7) % len(rows)].answer)  # a wrong answer for this completion
    return completions, answers


def timed(
    workers: int, completions: list[str], answers: list, batched: bool, fast_path: bool, runs: int
) -> float:
    """Median checks/second over ``runs`` timed passes after one untimed warm-up pass."""
    rates = []
    with Verifier(num_workers=workers, fast_path=fast_path) as v:
        for run in range(runs + 1):
            start = time.perf_counter()
            if batched:
                v.verify_batch(completions, answers)
            else:
                for c, a in zip(completions, answers):
                    v.verify_batch([c], [a])
            if run > 0:
                rates.append(len(completions) / (time.perf_counter() - start))
    return statistics.median(rates)


def pool_start(workers: int, runs: int) -> float:
    """Median seconds from ``Verifier(...)`` to the first answered check (workers started, math-verify imported)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        with Verifier(num_workers=workers) as v:
            v.verify_batch(["\\boxed{x+1}"], ["1+x"])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description="verifier throughput")
    parser.add_argument("--n", type=int, default=400, help="number of checks (half right, half wrong)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="pool sizes for the batch")
    parser.add_argument("--runs", type=int, default=3, help="runs per setting; the median is reported")
    args = parser.parse_args()
    completions, answers = items(args.n)
    print(f"{len(completions)} checks, {os.cpu_count()} CPUs, median of {args.runs} runs\n")
    print(f"{'mode':<34}{'fast path':>10}{'checks/s':>12}")
    for fast_path in (True, False):
        rate = timed(1, completions, answers, False, fast_path, args.runs)
        print(f"{'loop of verify() (1 at a time)':<34}{str(fast_path):>10}{rate:>12.1f}")
        for w in args.workers:
            rate = timed(w, completions, answers, True, fast_path, args.runs)
            print(f"{f'verify_batch, {w} workers':<34}{str(fast_path):>10}{rate:>12.1f}")
    print()
    for w in args.workers:
        print(
            f"pool start, {w} workers: {pool_start(w, args.runs):.2f} s to the first answered check (median)"
        )


if __name__ == "__main__":
    main()
