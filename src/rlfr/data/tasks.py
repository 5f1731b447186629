"""The embedded procedural tasks: arithmetic problems from reasoning-gym, with worked solutions.

Contract: ``embedded_task(train_size, eval_size, seed, generators, configs, dev_size, multistep) ->
TaskSplits(train, eval, dev)``, ``multistep_task(train_size, eval_size, seed, dev_size)`` and
``transfer_task(size, seed, multistep) -> list[Example]``; ``task_splits(task, ...)`` gives the splits of one
of ``EMBEDDED_TASKS`` by name (``data.train``) and ``embedded_set(name, ...)`` one of ``EMBEDDED_SETS``
(``embedded``: the held-out split, ``embedded-dev``: the tuning split, ``embedded-transfer``: the transfer
task; ``embedded-multistep``, ``-multistep-dev`` and ``-multistep-transfer`` the same of the multi-step task).

Two tasks:
- ``embedded``, the one-line task: short problems whose solution is one or two lines (about 20 tokens).
- ``embedded-multistep``: 5-6 terms of 1-2 digits with ``+`` and ``-`` (``basic_arithmetic`` with
  parentheses and negative numbers, ``chain_sum``), whose worked solutions (``rlfr.data.multistep``) write
  every intermediate result in a sentence and rewrite the expression: 4-5 steps, 100-180 tokens of the demo
  model. A wrong answer comes from a wrong step on a path, which a flow reward can judge; on the one-line
  task a correct and a wrong response differ by one number. Its transfer set has 7 terms (6 steps).

- Problems come from reasoning-gym generators (one-line task: ``basic_arithmetic`` and ``chain_sum`` with
  2-3 terms of 1-2 digits; ``gsm_symbolic`` is also supported). Sizes are split evenly over the generators
  (remainder to the first) and the result is shuffled with ``seed``.
- Splits (of either task) come from disjoint reasoning-gym seeds (train ``2*seed``, eval ``2*seed+1``, dev
  ``2*seed+1 + 10**6``) AND are de-duplicated by problem text: no eval or dev problem appears in train, no
  problem twice in a split. Eval is generated first, so it depends on ``eval_size`` and ``seed`` only; the
  dev split (``dev_size > 0``, default 0) is for choosing settings without touching eval; with
  ``dev_size = 0`` the splits are exactly those of earlier versions.
- The transfer task (``transfer_task``): problems of the same family that no run trains on and that need
  more steps: ``chain_sum`` with 4 terms and ``basic_arithmetic`` with 3 terms (+ and -), 1-2 digits each
  (multi-step task: 7 terms of each).
- Every Example has a worked ``solution`` ending in ``\\boxed{answer}``, for the supervised cold-start
  stage (a 135M model cannot produce boxed answers without it). For arithmetic the steps are computed here
  from the expression (safe ``ast`` walk, no ``eval``) and the last step is asserted to equal
  reasoning-gym's answer (multi-step solutions: also that their steps are those of ``arithmetic_steps``);
  for ``gsm_symbolic`` the template's ``answer_cot`` is used with its ``#### x`` line replaced by
  ``\\boxed{x}``.
- reasoning-gym's ``basic_arithmetic`` floor-divides; when ``"/"`` is enabled, rows whose exact value
  differs from its answer are dropped (a worked solution would be wrong), and the count is logged; the
  same for ``gsm_symbolic`` rows whose ``answer_cot`` ends in a different number than the answer.

Departure from the paper: RLFR trains on maths datasets with 1.5B-8B models; this task exists so the
whole pipeline can be exercised end to end with a 135M model on CPU.
"""

from __future__ import annotations

import ast
import logging
import random
from fractions import Fraction
from typing import Any, NamedTuple

from rlfr.data.examples import Example
from rlfr.data.multistep import reduction_steps, worked_solution

logger = logging.getLogger(__name__)

DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": dict(
        min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+", "-", "*"),
        allow_parentheses=False, allow_negation=False,
    ),
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    "gsm_symbolic": dict(),
}  # fmt: skip
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


EMBEDDED_TASKS = ("embedded", "embedded-multistep")  # whole tasks, for data.train
# each task's held-out split (its name), tuning split (-dev) and transfer set (-transfer)
_SETS = {f"{t}{s and '-' + s}": (t, s) for t in EMBEDDED_TASKS for s in ("", "dev", "transfer")}
EMBEDDED_SETS = tuple(_SETS)
TRANSFER_CONFIGS: dict[str, dict[str, Any]] = {
    "chain_sum": dict(min_terms=4, max_terms=4, min_digits=1, max_digits=2),
    "basic_arithmetic": dict(
        min_terms=3, max_terms=3, min_digits=1, max_digits=2, operators=("+", "-"),
        allow_parentheses=False, allow_negation=False,
    ),
}  # fmt: skip
_MULTISTEP_ARITHMETIC = dict(operators=("+", "-"), allow_parentheses=True, allow_negation=False)
MULTISTEP_CONFIGS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": dict(min_terms=5, max_terms=6, min_digits=1, max_digits=2, **_MULTISTEP_ARITHMETIC),
    "chain_sum": dict(min_terms=5, max_terms=6, min_digits=1, max_digits=2),
}
MULTISTEP_TRANSFER_CONFIGS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": dict(min_terms=7, max_terms=7, min_digits=1, max_digits=2, **_MULTISTEP_ARITHMETIC),
    "chain_sum": dict(min_terms=7, max_terms=7, min_digits=1, max_digits=2),
}


class TaskSplits(NamedTuple):
    train: list[Example]
    eval: list[Example]
    dev: list[Example] = []


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def arithmetic_steps(expression: str) -> tuple[list[str], Fraction]:
    """Worked steps ``["a + b = c", ...]`` (post-order, so precedence is respected) and the exact value."""
    steps: list[str] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            op = _OPS[type(node.op)]
            if op == "/" and b == 0:
                raise ZeroDivisionError(expression)
            v = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
            steps.append(f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(v)}")
            return v
        raise ValueError(f"unsupported expression {expression!r} ({ast.dump(node)[:60]})")

    value = walk(ast.parse(expression, mode="eval").body)
    return steps, value


def _arithmetic_example(row: dict, ex_id: str) -> Example | None:
    steps, value = arithmetic_steps(row["metadata"]["expression"])
    if _fmt(value) != row["answer"].strip():
        return None  # reasoning-gym floor-divided an inexact division
    solution = "".join(s + ".\n" for s in steps) + f"\\boxed{{{row['answer'].strip()}}}"
    return Example(problem=row["question"], answer=row["answer"].strip(), solution=solution, id=ex_id)


def _multistep_example(row: dict, ex_id: str) -> Example:
    expression, answer = row["metadata"]["expression"], row["answer"].strip()
    steps, value = reduction_steps(expression)
    reference, exact = arithmetic_steps(expression)  # the same steps, computed independently
    if [s.operation for s in steps] != reference or str(value) != answer or exact != value:
        raise AssertionError(f"{ex_id}: worked steps of {expression!r} disagree with the answer {answer!r}")
    return Example(row["question"], answer, worked_solution(steps, answer), ex_id)


def _gsm_example(row: dict, ex_id: str) -> Example | None:
    cot: str = row["metadata"]["answer_cot"].rstrip()
    body, sep, final = cot.rpartition("####")
    answer = row["answer"].strip()
    try:  # the cot sometimes writes "72.0" for the answer "72"
        consistent = bool(sep) and Fraction(final.strip()) == Fraction(answer)
    except ValueError:
        consistent = False
    if not consistent:
        return None  # a worked solution that disagrees with the answer would teach the wrong thing
    return Example(row["question"], answer, body.rstrip() + f"\n\\boxed{{{answer}}}", ex_id)


def _generate(
    gen: str, n: int, seed: int, exclude: set[str], split: str, config: dict, multistep: bool = False
) -> list[Example]:
    import reasoning_gym  # lazy: its import takes seconds; only the embedded task needs it

    if gen not in DEFAULT_CONFIGS:
        raise ValueError(f"unsupported generator {gen!r}; supported: {', '.join(DEFAULT_CONFIGS)}")
    virtual = 20 * n + 100  # room for duplicates and dropped rows
    ds = reasoning_gym.create_dataset(gen, size=virtual, seed=seed, **config)
    out: list[Example] = []
    dropped = 0
    for i in range(virtual):
        if len(out) == n:
            break
        row = ds[i]
        if row["question"] in exclude:
            continue
        make = _gsm_example if gen == "gsm_symbolic" else _arithmetic_example
        if multistep and gen != "gsm_symbolic":
            make = _multistep_example
        ex = make(row, f"{gen}-{split}-{i}")
        if ex is None:
            dropped += 1
            continue
        exclude.add(ex.problem)
        out.append(ex)
    if len(out) < n:
        raise ValueError(f"{gen}: only {len(out)} unique {split} problems of {n} requested with {config}")
    if dropped:
        logger.info(
            "%s %s: dropped %d rows whose worked solution disagrees with the answer", gen, split, dropped
        )
    return out


def embedded_task(
    train_size: int = 2000,
    eval_size: int = 200,
    seed: int = 0,
    generators: tuple[str, ...] = ("basic_arithmetic", "chain_sum"),
    configs: dict[str, dict[str, Any]] | None = None,
    dev_size: int = 0,
    multistep: bool = False,
) -> TaskSplits:
    """Train/eval(/dev) splits of the embedded task (see module docstring). ``configs`` overrides the default
    reasoning-gym config per generator, e.g. ``{"chain_sum": {"max_terms": 4}}``."""
    if not generators:
        raise ValueError("embedded_task needs at least one generator")
    splits = {"dev": []}
    seen: set[str] = set()  # eval (and dev) first, so that train excludes every held-out problem
    order = [("eval", eval_size, 2 * seed + 1)]
    if dev_size > 0:
        order.append(("dev", dev_size, 2 * seed + 1 + 10**6))
    for split, size, split_seed in (*order, ("train", train_size, 2 * seed)):
        examples: list[Example] = []
        for k, gen in enumerate(generators):
            n = size // len(generators) + (size % len(generators) if k == 0 else 0)
            config = {**DEFAULT_CONFIGS.get(gen, {}), **(configs or {}).get(gen, {})}
            examples += _generate(gen, n, split_seed, seen, split, config, multistep)
        random.Random(split_seed).shuffle(examples)
        splits[split] = examples
    return TaskSplits(train=splits["train"], eval=splits["eval"], dev=splits["dev"])


def multistep_task(
    train_size: int = 2000, eval_size: int = 200, seed: int = 0, dev_size: int = 0
) -> TaskSplits:
    """Train/eval(/dev) splits of the multi-step task (``MULTISTEP_CONFIGS``, worked solutions of
    ``rlfr.data.multistep``), with the seeds and de-duplication of ``embedded_task``."""
    gens = tuple(MULTISTEP_CONFIGS)
    return embedded_task(train_size, eval_size, seed, gens, MULTISTEP_CONFIGS, dev_size, multistep=True)


def task_splits(task: str, train_size: int, eval_size: int, seed: int = 0, dev_size: int = 0) -> TaskSplits:
    """The splits of one of ``EMBEDDED_TASKS`` by name (``data.train``)."""
    if task == "embedded":
        return embedded_task(train_size=train_size, eval_size=eval_size, seed=seed, dev_size=dev_size)
    if task == "embedded-multistep":
        return multistep_task(train_size, eval_size, seed, dev_size)
    raise ValueError(f"unknown embedded task {task!r}; valid: {', '.join(EMBEDDED_TASKS)}")


def transfer_task(size: int, seed: int = 0, multistep: bool = False) -> list[Example]:
    """The transfer task: longer problems of the same family (module docstring), from its own seeds; with
    ``multistep`` those of the multi-step task (``MULTISTEP_TRANSFER_CONFIGS``)."""
    configs = MULTISTEP_TRANSFER_CONFIGS if multistep else TRANSFER_CONFIGS
    gens = tuple(configs)
    out: list[Example] = []
    seen: set[str] = set()
    for k, gen in enumerate(gens):
        n = size // len(gens) + (size % len(gens) if k == 0 else 0)
        out += _generate(gen, n, 2 * seed + 1 + 2 * 10**6, seen, "transfer", configs[gen], multistep)
    random.Random(seed).shuffle(out)
    return out


def embedded_set(name: str, size: int, seed: int = 0, dev_size: int = 0) -> list[Example]:
    """One of ``EMBEDDED_SETS``: a task's held-out split (``size`` problems), its dev split (``dev_size``
    problems; ``size`` is the held-out size it is disjoint from) or ``size`` of its transfer problems."""
    if name not in _SETS:
        raise ValueError(f"unknown embedded set {name!r}; valid: {', '.join(EMBEDDED_SETS)}")
    task, part = _SETS[name]
    if part == "transfer":
        return transfer_task(size, seed, multistep=task == "embedded-multistep")
    if part == "dev" and dev_size < 1:
        raise ValueError("the dev split needs data.dev_size > 0 (and training runs with the same dev_size)")
    splits = task_splits(task, train_size=1, eval_size=size, seed=seed, dev_size=dev_size if part else 0)
    return splits.dev if part else splits.eval
