"""How long the ``rlfr`` command takes to answer, whole process (interpreter start, imports, output).

    python benchmarks/cli_startup.py [--runs 10]

Runs each command line ``--runs`` times as a fresh process (``python -m rlfr.cli ...``, the same as the
``rlfr`` script) and prints the median and the range of the wall-clock times:

- ``rlfr --help``: the command list (imports no config and no recipe);
- ``rlfr train --help``: one command's settings (its config schema, no torch);
- ``rlfr train --show-config``: the resolved configuration (the same);
- ``python -c pass``: the interpreter alone, for scale.

The target (issue 28) is a median under 0.5 s for ``rlfr --help``. Times depend on the machine and its load:
compare rows of one run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "rlfr --help": ["-m", "rlfr.cli", "--help"],
    "rlfr train --help": ["-m", "rlfr.cli", "train", "--help"],
    "rlfr train --show-config": ["-m", "rlfr.cli", "train", "--show-config"],
}


def time_command(argv: list[str], runs: int) -> list[float]:
    """Wall-clock seconds of ``runs`` fresh processes of ``python argv`` (each must succeed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="processes per command line (the median is reported)")
    args = p.parse_args()
    print(f"| command | median s | min s | max s |   ({args.runs} runs each, whole process)")
    print("|---|--:|--:|--:|")
    for name, argv in COMMANDS.items():
        t = time_command(argv, args.runs)
        print(f"| `{name}` | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} |")


if __name__ == "__main__":
    main()
