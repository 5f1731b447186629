"""Worked solutions that take several steps: every intermediate result written out, the expression rewritten.

Contract: ``reduction_steps(expression) -> (list[Step], value)`` and ``worked_solution(expression, answer)
-> str``. The multi-step embedded task (``rlfr.data.tasks``, ``embedded-multistep``) uses them, so that a
response is a path of 4-5 computations (6 on its transfer set; 100+ tokens) on which a wrong sample goes
astray at some step, and a flow reward has a path to judge (on the one-line task a correct and a wrong answer
differ by one number).

A solution reduces the expression one operation at a time, in the order of evaluation (innermost
parentheses first, ``*`` before ``+``/``-``, left to right: the post-order of the syntax tree, the order of
``rlfr.data.tasks.arithmetic_steps``) and rewrites the rest of the expression after each step, keeping the
problem's own parentheses and spacing (a group reduced to one number loses its parentheses)::

    Calculate 2 + ( ( 4 * 7 ) - 7 ).
    First, 4 * 7 = 28, so the expression becomes 2 + ( 28 - 7 ).
    Next, 28 - 7 = 21, so the expression becomes 2 + 21.
    Finally, 2 + 21 = 23.
    \\boxed{23}

Correct by construction: the expression is parsed with ``ast`` (never ``eval``); integers, a minus sign on
an integer and ``+ - *`` are the only syntax accepted; after every step the rewritten expression is parsed
again and must have the same value, and the steps must be those of ``arithmetic_steps``. The task asserts
the value against reasoning-gym's answer.
"""

from __future__ import annotations

import ast
from typing import NamedTuple

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


class Step(NamedTuple):
    operation: str  # "a op b = c"
    rest: str  # the expression after this step ("" after the last step)


class _Num(NamedTuple):
    value: int
    paren: bool = False


class _Op(NamedTuple):
    op: str
    left: _Num | _Op
    right: _Num | _Op
    paren: bool = False


def _parenthesised(source: str, node: ast.AST) -> bool:
    """Whether ``node`` is wrapped in its own parentheses in ``source``: the first non-blank character before
    its span is ``(`` and the first after it ``)``. A balanced subexpression between them means they are a
    pair (the ``(`` opens the innermost group that holds it and the ``)`` closes that group)."""
    before = source[: node.col_offset].rstrip()
    after = source[node.end_col_offset :].lstrip()
    return before.endswith("(") and after.startswith(")")


def _tree(source: str, node: ast.AST) -> _Num | _Op:
    paren = _parenthesised(source, node)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return _Num(node.value, paren)
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) is int
    ):
        return _Num(-node.operand.value, paren)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _Op(_OPS[type(node.op)], _tree(source, node.left), _tree(source, node.right), paren)
    raise ValueError(
        f"unsupported expression {source!r}: a multi-step solution takes integers, '-' on an integer and "
        f"+ - * only ({ast.dump(node)[:60]})"
    )


def _render(t: _Num | _Op) -> str:
    text = str(t.value) if isinstance(t, _Num) else f"{_render(t.left)} {t.op} {_render(t.right)}"
    return f"( {text} )" if t.paren and isinstance(t, _Op) else text


def _reduce(t: _Op) -> tuple[_Num | _Op, str]:
    """One step: the first operation, in evaluation order, on two numbers -> (new tree, "a op b = c")."""
    if isinstance(t.left, _Op):
        left, step = _reduce(t.left)
        return t._replace(left=left), step
    if isinstance(t.right, _Op):
        right, step = _reduce(t.right)
        return t._replace(right=right), step
    a, b = t.left.value, t.right.value
    value = {"+": a + b, "-": a - b, "*": a * b}[t.op]
    return _Num(value), f"{a} {t.op} {b} = {value}"


def _eval(t: _Num | _Op) -> int:
    if isinstance(t, _Num):
        return t.value
    a, b = _eval(t.left), _eval(t.right)
    return {"+": a + b, "-": a - b, "*": a * b}[t.op]


def _parse(source: str) -> _Num | _Op:
    return _tree(source, ast.parse(source, mode="eval").body)


def reduction_steps(expression: str) -> tuple[list[Step], int]:
    """The steps of ``expression`` (module docstring) and its value; every rewritten expression is parsed
    again and must keep the value (an error here is a bug in the rewriting, never in the data)."""
    t = _parse(expression.strip())
    value = _eval(t)
    steps: list[Step] = []
    while isinstance(t, _Op):
        t, operation = _reduce(t)
        rest = "" if isinstance(t, _Num) else _render(t)
        if _eval(_parse(rest) if rest else t) != value:
            raise AssertionError(f"rewriting {expression!r} changed its value at {operation!r}: {rest!r}")
        steps.append(Step(operation, rest))
    return steps, value


def worked_solution(steps: list[Step], answer: str) -> str:
    """The text of a solution: one sentence per step, then ``\\boxed{answer}``."""
    lines = []
    for i, s in enumerate(steps):
        first = "First" if i == 0 else "Next"
        lines.append(f"{first}, {s.operation}, so the expression becomes {s.rest}." if s.rest else
                     f"{'Finally' if i else 'First'}, {s.operation}.")  # fmt: skip
    return "\n".join(lines) + f"\n\\boxed{{{answer}}}"
