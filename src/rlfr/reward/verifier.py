"""Verifiable reward: is the final answer of a completion equal to the ground truth?

Contract
--------
- ``extract_answer(text) -> str | None``: the final answer of a completion. Priority: the last
  ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; also the brace-less ``\\boxed 5`` form), then the last
  ``<answer>...</answer>``, then the last ``#### x`` line, then the last ``Answer: x``. A single linear
  scan per form (no backtracking regex), so a 1 MB string or 5,000 nested braces are cheap. An unbalanced
  last ``\\boxed{`` gives ``None`` (we do not guess where the model meant the box to end).
- ``verify(completion, answer, timeout=5.0) -> float``: 1.0 or 0.0. ``answer`` may be a list of accepted
  forms (any one counts). Fast in-process paths first (normalised string match, exact numeric compare
  so "142.0" == "142", "1/2" == "\\frac12", "50\\%" == "50"); then math-verify for LaTeX/symbolic
  equivalence, run in a worker *process* of a pebble pool with a hard per-task timeout (pebble kills a hung
  worker). Only a timeout, a missing answer, or an answer math-verify cannot process (it raises, or its
  worker dies on it) scores 0.0; each is counted (``Verifier.last_counts``, logged per RL step). A pool that
  breaks is rebuilt once and the checks retried; if it breaks again, ``VerifierError`` is raised: a broken
  pool never turns right answers into zeros. ``timeout`` must be a finite number of seconds > 0 (an infinite
  one would let a check run forever). Safe to call from any thread and in any process (see below).
- ``Verifier``: context manager holding the pool; ``verify_batch(completions, answers) -> list[float]``.
  Module-level ``verify`` / ``verify_batch`` use a lazily created shared ``Verifier``.
- ``format_reward(completion) -> float``: 1.0 when an answer form is present.
- ``answer_key(completion) -> str | None``: the final answer as a voting key (equal numbers share one).

Safety: text is never evaluated as code. math-verify is used with ``LatexExtractionConfig`` only,
because its ``ExprExtractionConfig`` goes through ``sympy.parse_expr``, which calls ``eval``. math-verify's
own SIGALRM timeouts are disabled (``parsing_timeout=None``, ``timeout_seconds=None``) because SIGALRM only
works in a main thread; the process pool gives the hard timeout instead.

Workers start with forkserver (safe with torch threads) and never import the user's ``__main__``: a
multiprocessing child normally re-runs the parent's main script (``spawn.prepare``), which breaks a script
without an ``if __name__ == "__main__":`` guard, a script read from stdin or a notebook. Our worker processes
(``_CleanProcess``) are started with the main-module entries removed from the data the child prepares from;
they only need ``rlfr`` and ``math_verify``, importable from ``sys.path``. ``Verifier`` sets the
(process-global) forkserver preload to ``math_verify`` so that replacing a killed worker does not re-import
sympy.

Other processes (a ``multiprocessing`` child of any start method, a ``multiprocessing.Pool`` or DataLoader
worker, a ``datasets.map(num_proc=...)`` worker): every check still runs in a worker process with a hard
timeout, never in the caller, so the guarantees above hold everywhere. What differs per process:
- one pool per process: a ``Verifier`` (the shared one too) that crosses a fork starts its own pool in the
  child on first use; the parent's copy is left alone (its workers and manager threads are the parent's);
- a process forked from one that imported this module starts its workers with spawn: a forkserver the parent
  started is the parent's, and cannot fork children for the child;
- in a daemonic process (Pool and DataLoader workers) multiprocessing refuses to start children, lest they be
  orphaned when the daemon is terminated; ours end by themselves when their parent goes (a pebble worker
  exits when its task pipe closes), so the daemon flag is lifted while one of them starts;
- cleanup: the pool is stopped by a ``multiprocessing.util.Finalize`` when its ``Verifier`` is collected or
  at exit, before multiprocessing joins a process's children. That also runs in multiprocessing children,
  where ``atexit`` handlers do not (before, a child that had used ``verify`` waited forever for its workers).

Departure from the paper / authors' code: the paper's reward is binary 0/1, which is the default here.
The authors' code gives 0.5 to a boxed-but-wrong answer: ``reward.outcome=authors`` (``rlfr.reward.functions``)
reproduces it; ``Verifier(format_score=0.5)`` gives 0.5 to any extractable wrong answer, boxed or not.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.context
import multiprocessing.spawn
import multiprocessing.util
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from fractions import Fraction

from pebble import ProcessExpired, ProcessPool

from rlfr.errors import VerifierError

logger = logging.getLogger(__name__)

Answer = str | Sequence[str]
_BOX_CMDS = ("\\boxed", "\\fbox")
# Numeric fast paths only look at short strings: a 1 MB "number" is never worth converting here.
_MAX_FAST_CHARS = 200


# ----------------------------------------------------------------------------------------- extraction
def _braced(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at ``text[open_pos] == '{'``; None if unbalanced. O(n)."""
    depth = 0
    for i in range(open_pos, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
    return None


def _last_boxed(text: str) -> tuple[bool, str | None]:
    """(found, content) for the last \\boxed / \\fbox command."""
    pos, cmd = max((text.rfind(c), c) for c in _BOX_CMDS)
    if pos < 0:
        return False, None
    j = pos + len(cmd)
    if j < len(text) and text[j] == "{":
        return True, _braced(text, j)
    if j < len(text) and text[j] == " ":  # "\boxed 5": the token after the space
        rest = text[j:].lstrip(" ")
        m = re.match(r"[^\s$]+", rest)
        return True, (m.group(0) if m else None)
    return True, None


def extract_answer(text: str) -> str | None:
    """The final answer in ``text`` (see module docstring for the priority), stripped; None if absent."""
    found, boxed = _last_boxed(text)
    if found:
        return boxed.strip() if boxed is not None and boxed.strip() else None
    start = text.rfind("<answer>")
    if start >= 0:
        end = text.find("</answer>", start)
        if end >= 0:
            inner = text[start + len("<answer>") : end].strip()
            return inner or None
    pos = text.rfind("####")
    if pos >= 0:
        line = text[pos + 4 :].split("\n", 1)[0].strip()
        if line:
            return line
    pos = text.lower().rfind("answer:")
    if pos >= 0:
        line = text[pos + len("answer:") :].split("\n", 1)[0].strip().rstrip(".").strip("$ ")
        if line:
            return line
    return None


def format_reward(completion: str) -> float:
    """1.0 if the completion contains a final-answer form that ``extract_answer`` finds, else 0.0."""
    return 1.0 if extract_answer(completion) is not None else 0.0


# ------------------------------------------------------------------------------------------ fast paths
_STRIP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "$", " ", "\n", "\t")
_DEC = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")
# \frac{12}{3} or \frac12 (without braces LaTeX takes one token each: \frac123 is (1/2)*3, not 12/3)
_FRAC = re.compile(r"([-+]?)\\frac(?:\{([-+]?\d+)\}|(\d))(?:\{([-+]?\d+)\}|(\d))")
_SLASH = re.compile(r"([-+]?\d+)/(\d+)")


def _normalize(s: str) -> str:
    s = s.strip().rstrip(".")
    for tok in _STRIP:
        s = s.replace(tok, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if s.startswith("\\text{") and s.endswith("}") and s.count("{") == 1:
        s = s[len("\\text{") : -1]
    return s.lower()


def _number(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_plain_decimal_literal) for a normalised numeric string; None otherwise."""
    if len(s) > _MAX_FAST_CHARS:
        return None
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").rstrip("%")
    if _DEC.fullmatch(s):
        return Fraction(s), True
    if _THOUSANDS.fullmatch(s):
        return Fraction(s.replace(",", "")), True
    m = _FRAC.fullmatch(s)
    if m:
        sign, num, den = m[1], m[2] or m[3], m[4] or m[5]
    elif m := _SLASH.fullmatch(s):
        sign, num, den = "", m[1], m[2]
    if m:
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if sign == "-" else value), False
    return None


def answer_key(completion: str) -> str | None:
    """The voting key of a completion's final answer (majority votes in ``rlfr select``): None without an answer;
    a number's exact value for a numeric answer ("142.0", "142" and "\\frac{284}{2}" share the key "142"); else the
    normalised string that the fast path compares. Answers equal only to math-verify get different keys."""
    pred = extract_answer(completion)
    if pred is None:
        return None
    norm = _normalize(pred)
    num = _number(norm)
    return str(num[0]) if num is not None else norm


def fast_check(pred: str, golds: Sequence[str]) -> bool | None:
    """True/False when decidable in-process without sympy, None when math-verify must decide.

    A definite False is returned only when both sides are integer-valued decimal literals (the bulk of
    training checks); anything else that does not match here goes on to math-verify.
    """
    p = _normalize(pred)
    pn = _number(p)
    all_integer_mismatch = pn is not None and pn[1] and pn[0].denominator == 1
    for gold in golds:
        g = _normalize(gold)
        if p == g:
            return True
        gn = _number(g)
        if pn is not None and gn is not None and pn[0] == gn[0]:
            return True
        if gn is None or not gn[1] or gn[0].denominator != 1:
            all_integer_mismatch = False
    return False if all_integer_mismatch else None


# ------------------------------------------------------------------------------------- worker process
def math_verify_check(pred: str, golds: list[str]) -> bool:
    """Runs in a worker process: math-verify equivalence of ``pred`` against any of ``golds``."""
    from math_verify import LatexExtractionConfig, parse  # lazy: only the worker processes import math-verify
    from math_verify import verify as mv_verify  # lazy: as above

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    target = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
    if not target:
        return False
    for gold in golds:
        parsed_gold = parse("\\boxed{" + gold + "}", extraction_config=config, parsing_timeout=None)
        if parsed_gold and mv_verify(parsed_gold, target, timeout_seconds=None):
            return True
    return False


def _warm_up() -> None:
    # math-verify warns on every call that its own timeout is disabled; the pool's timeout replaces it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # One tiny check builds the LaTeX grammar (~0.2 s), so a worker's first real check is not charged it.
    math_verify_check("x+1", ["1+x"])


def _golds(answer: Answer) -> list[str]:
    if isinstance(answer, str):
        return [answer]
    golds = list(answer)
    if not golds or not all(isinstance(g, str) for g in golds):
        raise TypeError(f"answer must be a str or a non-empty list of str, got {answer!r}")
    return golds


# ------------------------------------------------------------------------- workers that skip __main__
_launching = threading.local()
_original_preparation_data = multiprocessing.spawn.get_preparation_data


def _preparation_data(name):
    """``spawn.get_preparation_data`` without the main-module entries while one of our workers starts
    (flagged per thread, so processes that other code starts meanwhile are untouched)."""
    data = _original_preparation_data(name)
    if getattr(_launching, "clean", False):
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


multiprocessing.spawn.get_preparation_data = _preparation_data


class _CleanStart:
    """``start`` of our worker processes (mixed into a context's Process class)."""

    def start(self) -> None:
        # a daemonic process may not start children; ours end with their parent (module docstring)
        me = multiprocessing.current_process()
        daemonic = me.daemon
        _launching.clean = True
        try:
            if daemonic:
                me.daemon = False
            super().start()
        finally:
            if daemonic:
                me.daemon = True
            _launching.clean = False


class _CleanProcess(_CleanStart, multiprocessing.context.ForkServerProcess):
    pass


class _CleanSpawnProcess(_CleanStart, multiprocessing.context.SpawnProcess):
    pass


class _CleanForkServerContext(multiprocessing.context.ForkServerContext):
    Process = _CleanProcess


class _CleanSpawnContext(multiprocessing.context.SpawnContext):
    Process = _CleanSpawnProcess


@dataclass
class VerifyCounts:
    """What happened to the checks of one ``verify_batch`` call."""

    total: int = 0
    no_answer: int = 0  # no final answer could be extracted: scored 0
    pooled: int = 0  # sent to math-verify in a worker (the rest were decided in-process)
    timeouts: int = 0  # math-verify ran out of time: scored 0
    errors: int = 0  # math-verify raised, or its worker died, on this answer: scored 0
    rebuilds: int = 0  # the pool broke and was rebuilt


class Verifier:
    """Pool of verifier worker processes. Use as a context manager or call ``close()``.

    Args:
        num_workers: worker processes for math-verify checks.
        timeout: seconds one math-verify check may run (from when it starts) before its worker is killed.
        format_score: score for an extractable but wrong answer (0.0 = the paper's binary reward).
        check_fn: picklable ``(pred, golds) -> bool`` run in the workers; default math-verify. A hook
            for tests and for users with a different equivalence checker.
        mp_context: "forkserver" (default) or "spawn"; plain fork is unsafe once torch threads exist.
        fast_path: False sends every extractable answer to ``check_fn`` (used to test math-verify itself).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout: float = 5.0,
        format_score: float = 0.0,
        check_fn: Callable[[str, list[str]], bool] = math_verify_check,
        mp_context: str = "forkserver",
        fast_path: bool = True,
    ) -> None:
        if mp_context not in ("forkserver", "spawn"):
            raise ValueError(f"mp_context must be 'forkserver' or 'spawn', got {mp_context!r}")
        if num_workers < 1:
            raise ValueError(f"need num_workers >= 1, got {num_workers}")
        _check_timeout(timeout)
        self.mp_context = mp_context
        self.num_workers = num_workers
        self.timeout = timeout
        self.format_score = format_score
        self.check_fn = check_fn
        self.fast_path = fast_path
        self.last_counts = VerifyCounts()
        self._pool: ProcessPool | None = None
        self._pool_pid: int | None = None  # the process whose pool ``_pool`` is
        self._finalizer: multiprocessing.util.Finalize | None = None
        self._pool_here()

    def _new_pool(self) -> ProcessPool:
        if self.mp_context == "spawn" or _forked:
            # in a forked child the forkserver, if the parent started one, is the parent's and cannot serve it
            ctx = _CleanSpawnContext()
        else:
            ctx = _CleanForkServerContext()
            # Workers fork from a server that already imported sympy: a worker killed on timeout is
            # replaced in milliseconds instead of re-importing sympy (~1 s).
            ctx.set_forkserver_preload(["math_verify"])
        return ProcessPool(max_workers=self.num_workers, initializer=_warm_up, context=ctx)

    def _pool_here(self, replace: bool = False) -> ProcessPool:
        """This process's pool, started on first use in each process (module docstring): a forked child's copy
        of its parent's pool has neither the parent's worker processes nor its manager threads. ``replace``
        stops this process's pool and starts another."""
        with _pool_lock:
            if replace or self._pool is None or self._pool_pid != os.getpid():
                if self._finalizer is not None:
                    self._finalizer()  # stops the old pool; ignored in another process than the one it was made in
                self._pool, self._pool_pid = self._new_pool(), os.getpid()
                # runs when the Verifier is collected, or at exit before multiprocessing joins the children (in a
                # multiprocessing child, where atexit handlers do not run, too), so no process waits for workers
                self._finalizer = multiprocessing.util.Finalize(
                    self, _stop_pool, (self._pool,), exitpriority=10
                )
            return self._pool

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent; a later check starts a new pool)."""
        with _pool_lock:
            if self._finalizer is not None:
                self._finalizer()
            self._pool = self._finalizer = None

    def _run_pooled(
        self, jobs: dict[int, tuple[str, list[str]]], timeout: float, counts: VerifyCounts
    ) -> dict:
        """Check ``jobs`` (index -> (pred, golds)) in the pool; -> index -> bool. A broken pool is rebuilt
        once and the unfinished checks are retried."""
        results: dict[int, bool] = {}
        for attempt in range(2):
            pending = {i: job for i, job in jobs.items() if i not in results}
            try:
                pool = self._pool_here()
                futures = {
                    i: pool.schedule(self.check_fn, job, timeout=timeout) for i, job in pending.items()
                }
                for i, fut in futures.items():
                    try:
                        results[i] = bool(fut.result())
                    except FutureTimeout:
                        counts.timeouts += 1
                        results[i] = False
                        logger.warning("verifier: check %d timed out after %.1fs; scored 0", i, timeout)
                    except ProcessExpired as e:  # the worker died on this input (e.g. a C stack overflow)
                        counts.errors += 1
                        results[i] = False
                        logger.warning("verifier: worker died on check %d (%s); scored 0", i, e)
                    except RuntimeError as e:
                        if "Pool" in str(e):  # the pool itself broke: not this answer's fault
                            raise
                        counts.errors += 1
                        results[i] = False
                        logger.warning("verifier: check %d raised %r; scored 0", i, e)
                    except Exception as e:  # noqa: BLE001 - math-verify could not process this answer
                        counts.errors += 1
                        results[i] = False
                        logger.warning("verifier: check %d raised %r; scored 0", i, e)
                return results
            except RuntimeError as e:  # "Unexpected error within the Pool" / "The Pool is not active"
                if attempt == 1:
                    raise VerifierError(
                        f"the verifier's worker pool broke twice ({e}); no answer was scored 0 for it"
                    ) from e
                logger.warning("verifier: the worker pool broke (%s); rebuilding it and retrying", e)
                counts.rebuilds += 1
                self._pool_here(replace=True)
        return results

    def verify_batch(
        self, completions: Sequence[str], answers: Sequence[Answer], timeout: float | None = None
    ) -> list[float]:
        """Scores in [0, 1] for each (completion, answer) pair (see the module docstring for what scores 0);
        ``last_counts`` then says how many checks timed out, had no answer, or could not be processed."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        timeout = self.timeout if timeout is None else _check_timeout(timeout)
        counts = VerifyCounts(total=len(completions))
        correct: list[bool] = [False] * len(completions)
        preds: list[str | None] = [extract_answer(c) for c in completions]
        jobs = {}
        for i, (pred, answer) in enumerate(zip(preds, answers)):
            golds = _golds(answer)
            if pred is None:
                counts.no_answer += 1
                continue
            decided = fast_check(pred, golds) if self.fast_path else None
            if decided is None:
                jobs[i] = (pred, golds)
            else:
                correct[i] = decided
        counts.pooled = len(jobs)
        if jobs:
            for i, ok in self._run_pooled(jobs, timeout, counts).items():
                correct[i] = ok
        self.last_counts = counts
        return [
            1.0 if ok else (self.format_score if pred is not None else 0.0)
            for ok, pred in zip(correct, preds)
        ]


def _check_timeout(timeout: float) -> float:
    if not (timeout > 0 and math.isfinite(timeout)):  # inf would let a check run forever
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout}")
    return timeout


def _stop_pool(pool: ProcessPool) -> None:
    try:
        pool.stop()
        pool.join()
    except Exception:  # noqa: BLE001 - a broken pool may not stop cleanly; its workers end with their pipes
        logger.debug("verifier: stopping a pool failed", exc_info=True)


_default: Verifier | None = None
_default_lock = threading.Lock()
_pool_lock = threading.Lock()
_forked = False  # this process was forked from one that had imported this module


def _after_fork_in_child() -> None:
    global _forked, _default_lock, _pool_lock
    _forked = True
    # a lock another thread held at the fork would stay held forever in the child
    _default_lock, _pool_lock = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def default_verifier() -> Verifier:
    """The shared module-level Verifier (created on first use; its pool stops at exit, in every process)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Verifier(num_workers=max(1, min(4, (os.cpu_count() or 2))))
        return _default


def verify(completion: str, answer: Answer, timeout: float = 5.0) -> float:
    """1.0 if the final answer of ``completion`` matches ``answer`` (or any of a list), else 0.0."""
    return default_verifier().verify_batch([completion], [answer], timeout=timeout)[0]


def verify_batch(completions: Sequence[str], answers: Sequence[Answer], timeout: float = 5.0) -> list[float]:
    """Batch version of ``verify`` on the shared pool."""
    return default_verifier().verify_batch(completions, answers, timeout=timeout)
