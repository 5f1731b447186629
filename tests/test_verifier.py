"""Verifier: extraction, equivalence tables, hostile inputs, timeouts, threads."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from rlfr.reward.verifier import Verifier, extract_answer, fast_check, format_reward, verify

TIMEOUT = 1.0  # per-check timeout of the `short` pool: hostile inputs are cut off by it
# Checks whose answer the tests assert get a timeout no loaded machine reaches: a 1 s limit turned a right
# answer into a timeout once at load average 6 (a test must not depend on the machine's speed or load).
LONG = 120.0


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=2, timeout=LONG) as v:
        yield v


@pytest.fixture(scope="module")
def short():
    """A pool with a 1 s per-check timeout, for the checks that must be cut off."""
    with Verifier(num_workers=2, timeout=TIMEOUT) as v:
        yield v


def boxed(ans: str) -> str:
    return f"Let me work it out. The final answer is $\\boxed{{{ans}}}$."


# (model answer inside \boxed{}, ground truth); every pair must score 1.0
EQUIVALENT = [
    ("142", "142.0"), ("142.0", "142"), ("-7", "-7"), ("1,000", "1000"), ("0.5", "\\frac{1}{2}"),
    ("\\frac12", "1/2"), ("\\dfrac{3}{4}", "\\frac{3}{4}"), ("\\tfrac{3}{4}", "0.75"), ("3/4", "\\dfrac{3}{4}"),
    ("-\\frac{2}{3}", "\\frac{-2}{3}"), ("\\frac{6}{8}", "\\frac{3}{4}"), ("50\\%", "50"), ("50", "50\\%"),
    ("12.50", "12.5"), (".5", "0.5"), ("+3", "3"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}"), ("3\\sqrt{3}", "\\sqrt{27}"), ("30^\\circ", "30"),
    ("30^{\\circ}", "30"), ("45", "45^\\circ"), ("10\\text{ cm}", "10"), ("5 \\text{ meters}", "5"),
    ("\\$18.90", "18.90"), ("(1,2]", "(1, 2]"), ("[0, \\infty)", "[0,\\infty)"), ("(-\\infty, 3)", "(-\\infty,3)"),
    ("(1, 2)", "(1,2)"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("(2, -1, 3)", "(2,-1,3)"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("\\{3, 5, 7\\}", "\\{7,5,3\\}"), ("x+1", "1+x"), ("2x", "x \\cdot 2"),
    ("x^2-1", "(x-1)(x+1)"), ("\\pi", "\\pi"), ("2\\pi", "\\pi \\cdot 2"), ("\\frac{\\pi}{4}", "\\frac{1}{4}\\pi"),
    ("e^{2}", "e^2"), ("\\text{Evelyn}", "Evelyn"), ("Evelyn", "\\text{Evelyn}"), ("\\text{(C)}", "(C)"),
    ("yes", "Yes"), ("1, 2", "2, 1"), ("3, 5", "\\{3, 5\\}"), ("x=5", "5"), ("y = 2x + 3", "y=2x+3"),
    ("\\infty", "\\infty"), ("-\\infty", "-\\infty"), ("10^{3}", "1000"), ("2^{10}", "1024"), ("0.333333", "\\frac{1}{3}"),
    ("1.5\\times10^{3}", "1500"), ("4!", "24"), ("\\binom{5}{2}", "10"), ("|-3|", "3"), ("\\log_2 8", "3"),
    ("9.60", "9.6"), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\frac{7}{2}", "3.5"), ("75\\%", "75"), ("-0.25", "-\\frac{1}{4}"),
]  # fmt: skip
# (model answer, ground truth as a list of accepted forms)
EQUIVALENT_LISTS = [("9.6", ["9.6", "9.60", "10"]), ("10", ["9.6", "10"]), ("\\frac{1}{2}", ["0.5", "1/2"])]
# pairs that must score 0.0
NOT_EQUIVALENT = [
    ("141", "142"), ("142.1", "142"), ("-7", "7"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("0.5", "0.05"),
    ("2\\sqrt{2}", "\\sqrt{2}"), ("(1,2)", "[1,2]"), ("(1,2]", "(1,2)"), ("\\{1,2\\}", "\\{1,3\\}"),
    ("x+1", "x-1"), ("x^2", "2x"), ("\\pi", "3"), ("Evelyn", "Bob"), ("\\text{(C)}", "(D)"), ("(2,-1,3)", "(2,1,3)"),
    ("10^{3}", "100"), ("1000", "10000"), ("1,2,3", "1,2"), ("\\infty", "-\\infty"), ("\\frac{7}{2}", "7/3"),
    ("0", "1"), ("e", "\\pi"), ("y=2x+3", "y=2x-3"), ("30", "60^\\circ"),
]  # fmt: skip


@pytest.mark.parametrize(("pred", "gold"), EQUIVALENT + EQUIVALENT_LISTS)
def test_equivalent(verifier, pred, gold):
    assert verifier.verify_batch([boxed(pred)], [gold]) == [1.0]


@pytest.mark.parametrize(("pred", "gold"), NOT_EQUIVALENT)
def test_not_equivalent(verifier, pred, gold):
    assert verifier.verify_batch([boxed(pred)], [gold]) == [0.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{1} then \\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("\\boxed{\\boxed{7}}", "7"),
        ("the answer is \\boxed 5 and done", "5"),
        ("\\fbox{12}", "12"),
        ("<think>hmm</think> <answer> 42 </answer>", "42"),
        ("steps\n#### 1,234\n", "1,234"),
        ("Final Answer: $17$.", "17"),
        ("no answer here", None),
        ("\\boxed{1+{2", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def _lines_run(fn, *args) -> int:
    """Python lines executed by ``fn(*args)``: a count of work that does not depend on the machine's speed."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
    return count


def test_extract_is_linear():
    # hostile shapes are answered (no hang, no recursion) ...
    assert extract_answer("x" * 1_000_000) is None
    assert extract_answer("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}") == "{" * 5000 + "1" + "}" * 5000
    assert extract_answer("\\boxed{" * 5000 + "1") is None

    # ... with work linear in the input: 4x the nesting costs about 4x the lines (quadratic would be 16x).
    # Counted lines, not seconds, so a slow or loaded machine cannot fail this.
    def nested(n: int) -> str:
        return "Thus \\boxed{" + "{" * n + "1" + "}" * n + "}" + " x" * n

    small, big = _lines_run(extract_answer, nested(1000)), _lines_run(extract_answer, nested(4000))
    assert 3.5 < big / small < 4.5, (small, big)


def test_fast_path_decides_plain_numbers():
    assert fast_check("142", ["142.0"]) is True
    assert fast_check("141", ["142"]) is False
    assert fast_check("x+1", ["1+x"]) is None  # goes to math-verify
    assert fast_check("\\frac12", ["0.5"]) is True and fast_check("\\dfrac{-3}{6}", ["-1/2"]) is True
    assert fast_check("\\frac123", ["4"]) is None  # (1/2)*3 in LaTeX: not a plain fraction


def test_format_reward_and_score():
    assert format_reward("\\boxed{3}") == 1.0 and format_reward("three") == 0.0
    with Verifier(num_workers=1, format_score=0.5) as v:
        assert v.verify_batch(["\\boxed{3}", "\\boxed{4}", "four"], ["3", "3", "4"]) == [1.0, 0.5, 0.0]


HOSTILE = [
    "\\boxed{__import__('os').system('touch /tmp/rlfr_pwned')}",
    "Answer: __import__('os').system('touch /tmp/rlfr_pwned')",
    "\\boxed{1+{2",
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "\\boxed{" + "\\frac{" * 3000 + "1" + "}{2}" * 3000 + "}",
    "x" * 1_000_000,
    "\\boxed{" + "1" * 1_000_000 + "}",
]


def _check_hostile(v: Verifier, out: dict) -> None:
    out["scores"] = v.verify_batch(HOSTILE, ["5"] * len(HOSTILE))
    out["counts"] = v.last_counts


def test_hostile_inputs_main_and_worker_thread(short):
    if os.path.exists("/tmp/rlfr_pwned"):
        os.remove("/tmp/rlfr_pwned")
    main: dict = {}
    _check_hostile(short, main)
    thread: dict = {}
    t = threading.Thread(target=_check_hostile, args=(short, thread))
    t.start()
    t.join(timeout=600)  # a hang guard
    assert not t.is_alive()
    for out in (main, thread):
        assert out["scores"] == [0.0] * len(HOSTILE)
        # every check was answered: cut off by the per-check timeout or scored, never left running (which
        # ones time out depends on the machine's speed, so only the total is asserted)
        assert out["counts"].total == len(HOSTILE)
    assert not os.path.exists("/tmp/rlfr_pwned")
    assert short.verify_batch([boxed("x+1")], ["1+x"], timeout=LONG) == [1.0]  # the pool is still usable


def test_genuine_timeout_then_pool_still_usable(short):
    start = time.perf_counter()
    # sympy tries to evaluate the power tower, which no machine finishes: a real timeout, the worker is killed
    assert short.verify_batch([boxed("10^{10^{10^{10}}}")], ["5"]) == [0.0]
    assert short.last_counts.timeouts == 1
    assert time.perf_counter() - start >= TIMEOUT * 0.9  # it ran until the timeout (a lower bound only)
    assert short.verify_batch([boxed("\\frac{\\pi}{4}")], ["\\frac14\\pi"], timeout=LONG) == [1.0]


def test_module_level_verify_from_thread():
    results = []
    t = threading.Thread(target=lambda: results.append(verify(boxed("2\\sqrt{2}"), "\\sqrt{8}")))
    t.start()
    t.join(timeout=600)  # a hang guard
    assert results == [1.0]
    assert verify("no answer", "1") == 0.0


def test_a_new_pool_verifies_at_once():
    # its start-up time is measured in benchmarks/verifier.py ("pool start"), not asserted here
    with Verifier(num_workers=2) as v:
        assert v.verify_batch([boxed("x+1")], ["1+x"]) == [1.0]


def test_bad_arguments(verifier):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        verifier.verify_batch(["a", "b"], ["1"])
    with pytest.raises(TypeError, match="non-empty list of str"):
        verifier.verify_batch(["\\boxed{1}"], [[]])
    with pytest.raises(ValueError, match="mp_context"):
        Verifier(mp_context="fork")


SCRIPT = """from rlfr.reward.verifier import verify
print("score", verify("\\\\boxed{2\\\\sqrt{2}}", "\\\\sqrt{8}"))
"""


@pytest.mark.parametrize("how", ["script-without-guard", "stdin", "dash-c"])
def test_verify_works_from_any_main(tmp_path, how):
    """Workers never import the user's __main__: a script without the guard, stdin and -c all score right
    answers 1 (before, the pool re-ran the script in every worker, broke, and scored 0)."""
    import subprocess
    import sys

    path = tmp_path / "noguard.py"
    path.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if how == "script-without-guard":
        proc = subprocess.run(
            [sys.executable, str(path)], capture_output=True, text=True, timeout=600, env=env
        )
    elif how == "stdin":
        proc = subprocess.run(
            [sys.executable, "-"], input=SCRIPT, capture_output=True, text=True, timeout=600, env=env
        )
    else:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env
        )
    assert proc.returncode == 0 and "score 1.0" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_a_broken_pool_is_rebuilt_or_an_error(monkeypatch):
    from pebble.pool.base_pool import PoolStatus

    from rlfr.errors import VerifierError

    with Verifier(num_workers=1) as v:
        v._pool._context.status = PoolStatus.ERROR  # what pebble sets when its manager thread dies
        assert v.verify_batch([boxed("2\\sqrt{2}")], ["\\sqrt{8}"]) == [1.0]  # rebuilt, right answer kept
        assert v.last_counts.rebuilds == 1 and v.last_counts.pooled == 1

        def broken():
            pool = Verifier._new_pool(v)
            pool._context.status = PoolStatus.ERROR
            return pool

        v._pool._context.status = PoolStatus.ERROR
        monkeypatch.setattr(v, "_new_pool", broken)
        with pytest.raises(VerifierError, match="broke twice"):
            v.verify_batch([boxed("2\\sqrt{2}")], ["\\sqrt{8}"])


def test_counts_of_what_scored_zero(short, verifier):
    # a timeout (no machine finishes the power tower), a missing answer, a fast-path answer
    short.verify_batch([boxed("10^{10^{10^{10}}}"), "no answer here", boxed("7")], ["5", "1", "7"])
    c = short.last_counts
    assert (c.total, c.no_answer, c.timeouts, c.pooled) == (3, 1, 1, 1)
    # an answer only math-verify decides, under a limit no loaded machine reaches
    verifier.verify_batch([boxed("x+1")], ["1+x"])
    c = verifier.last_counts
    assert (c.total, c.no_answer, c.timeouts, c.pooled) == (1, 0, 0, 1)


IN_OTHER_PROCESSES = """
import multiprocessing as mp, sys
from rlfr.reward.verifier import verify

def check(i):  # x+i == i+x needs math-verify, so a worker process of the verifier's pool
    return verify("\\\\boxed{x+%d}" % i, "%d+x" % i)

def child(q):
    q.put(check(1))

if __name__ == "__main__":
    scenario = sys.argv[1]
    method = scenario.split("-")[-1]
    ctx = mp.get_context(method)
    if scenario.startswith("after-use"):  # the child inherits the parent's pool object
        print("parent", check(0), flush=True)
    if scenario.startswith("pool"):
        with ctx.Pool(2) as pool:  # daemonic workers; leaving the block terminates them
            print("scores", pool.map(check, range(4)), flush=True)
    else:
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        print("scores", [q.get(timeout=600)], flush=True)
        p.join(timeout=300)
        print("exitcode", p.exitcode, flush=True)
"""


def _alive_with(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (every descendant of a process started with it)."""
    import glob

    pids = []
    for f in glob.glob("/proc/[0-9]*/environ"):
        try:
            if marker.encode() in Path(f).read_bytes():
                pids.append(int(f.split("/")[2]))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("scenario", ["process-fork", "process-spawn", "process-forkserver", "after-use-fork",
                                      "pool-fork", "pool-spawn"])  # fmt: skip
def test_verify_works_and_exits_cleanly_in_other_processes(tmp_path, scenario):
    """``verify`` from a multiprocessing child (each start method), a child forked after the parent used it, and
    ``multiprocessing.Pool`` workers (daemonic; the ``with`` block terminates them): right answers score 1, every
    process exits, and no verifier worker is left behind. Before: children hung at exit (their pool's workers
    were never stopped), a Pool worker failed with "daemonic processes are not allowed to have children", and a
    child forked after use got VerifierError (the parent's pool and forkserver are not the child's)."""
    import subprocess
    import uuid

    script = tmp_path / "other_processes.py"
    script.write_text(IN_OTHER_PROCESSES)
    marker = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLFR_TEST_MARKER": marker}
    try:
        proc = subprocess.run([sys.executable, str(script), scenario], capture_output=True, text=True,
                              timeout=600, env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        expected = [1.0] * (4 if scenario.startswith("pool") else 1)
        assert f"scores {expected}" in proc.stdout, proc.stdout + proc.stderr[-3000:]
        if scenario.startswith("process") or scenario.startswith("after-use"):
            assert "exitcode 0" in proc.stdout, proc.stdout
        if scenario.startswith("after-use"):
            assert "parent 1.0" in proc.stdout
        # workers of a terminated Pool worker end when their task pipe closes: give them a moment
        for _ in range(40):
            if not (left := _alive_with(marker)):
                break
            time.sleep(0.25)
        assert not left, f"processes left behind: {left}"
    finally:  # whatever this test started and left (a hung run's children), it ends
        for pid in _alive_with(marker):
            os.kill(pid, signal.SIGKILL)
