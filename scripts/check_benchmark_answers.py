"""Self-consistency check of the verifier on the benchmark ground truths.

For every row of the six benchmark files, each accepted form of the ground truth is written as
``\\boxed{...}`` inside a sentence and verified against the row's answer; every one must score 1.0.

    python scripts/check_benchmark_answers.py [--dir DIR] [--workers 2]

with DIR holding ``<name>.jsonl`` copies (default: the benchmarks as ``data.eval=benchmark:NAME`` loads them:
``$RLFR_BENCHMARK_DIR`` or the ``datasets`` cache, ``rlfr data download``).

Prints a per-file table and the total; exits 1 if anything is below 100%.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rlfr.data import BENCHMARKS, load_benchmark, load_examples
from rlfr.reward.verifier import Verifier


def check(
    directory: Path | None, workers: int, fast_path: bool = True
) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(per-file (name, passed, total), descriptions of failures)."""
    rows, failures = [], []
    with Verifier(num_workers=workers, fast_path=fast_path) as verifier:
        for name in BENCHMARKS:
            examples = (
                load_benchmark(name) if directory is None else load_examples(directory / f"{name}.jsonl")
            )
            completions, answers, labels = [], [], []
            for ex in examples:
                forms = [ex.answer] if isinstance(ex.answer, str) else list(ex.answer)
                for form in forms:
                    completions.append(f"So the final answer is $\\boxed{{{form}}}$.")
                    answers.append(ex.answer)
                    labels.append(f"{ex.id}: {form!r}")
            scores = verifier.verify_batch(completions, answers)
            failures += [label for label, s in zip(labels, scores) if s != 1.0]
            rows.append((name, sum(s == 1.0 for s in scores), len(scores)))
    return rows, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory of <name>.jsonl copies (default: as rlfr loads them)",
    )
    parser.add_argument("--workers", type=int, default=2, help="verifier worker processes")
    parser.add_argument(
        "--no-fast-path", action="store_true", help="send every check to math-verify (tests its parsing)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    rows, failures = check(args.dir, args.workers, fast_path=not args.no_fast_path)
    print(f"{'file':<16}{'passed':>8}{'checks':>8}{'rate':>9}")
    for name, ok, n in rows:
        print(f"{name:<16}{ok:>8}{n:>8}{100 * ok / n:>8.1f}%")
    ok, n = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'total':<16}{ok:>8}{n:>8}{100 * ok / n:>8.1f}%   ({time.perf_counter() - start:.1f} s)")
    for f in failures:
        print("FAIL", f)
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
