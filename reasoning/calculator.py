"""A safe arithmetic evaluator: the "python" tool the model calls during generation.

The engine hands it whatever text the model wrote between <|python_start|> and <|python_end|>. That text is
untrusted (a policy under RL will try anything), so nothing here ever reaches eval/exec: the expression is parsed
with `ast` and walked over a whitelist of node types (numbers, + - * / // % **, unary +/-, comparisons). Every
intermediate value is bounded, powers are checked *before* they are computed, and the input length is capped, so a
call costs microseconds whatever the model writes. Any rejection or arithmetic error gives None; it never raises.
"""

from __future__ import annotations

import ast
import math
import operator
import warnings

MAX_INPUT_CHARS = 200      # longer spans are not arithmetic a model should be writing; reject before parsing
MAX_OUTPUT_CHARS = 120
MAX_EXPONENT = 100         # |b ** e| with |e| above this is rejected outright
MAX_MAGNITUDE = 1e100      # every literal, intermediate and result must stay within this
FLOAT_SIGNIFICANT_DIGITS = 10

_BINARY_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_COMPARE_OPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}


class _Rejected(Exception):
    """The expression uses something outside the whitelist or would leave the allowed range."""


def _check_magnitude(value):
    # bool is an int subclass; it only arises from comparisons, which are bounded by construction
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise _Rejected("non-finite")
    if not isinstance(value, (int, float)):  # e.g. complex from (-8) ** 0.5
        raise _Rejected("not a real number")
    if abs(value) > MAX_MAGNITUDE:
        raise _Rejected("too large")
    return value


def _check_power(base, exponent):
    """Reject b ** e before computing it when the result could be huge (or slow to compute)."""
    if isinstance(base, bool) or isinstance(exponent, bool):
        raise _Rejected("boolean operand")
    if abs(exponent) > MAX_EXPONENT:
        raise _Rejected("exponent too large")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise _Rejected("power too large")
    # a small |base| with a negative exponent blows up the same way: 1e-90 ** -2 = 1e180
    if 0 < abs(base) < 1 and exponent < 0 and -exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise _Rejected("power too large")


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # no strings, bytes, bools, None, complex, Ellipsis
            raise _Rejected("non-numeric literal")
        return _check_magnitude(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate(node.operand)
        if isinstance(operand, bool):
            raise _Rejected("boolean operand")
        return _check_magnitude(_UNARY_OPS[type(node.op)](operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(left, bool) or isinstance(right, bool):
            raise _Rejected("boolean operand")
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _check_magnitude(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE_OPS for op in node.ops):
        values = [_evaluate(node.left)] + [_evaluate(c) for c in node.comparators]
        if any(isinstance(v, bool) for v in values):
            raise _Rejected("boolean operand")
        return all(_COMPARE_OPS[type(op)](a, b) for op, a, b in zip(node.ops, values, values[1:]))
    raise _Rejected(type(node).__name__)


def format_number(value) -> str:
    """ints as ints; floats with 10 significant digits, shown as ints when they are whole and modest in size."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.{FLOAT_SIGNIFICANT_DIGITS}g}"
    return "0" if text == "-0" else text


def calculate(expression) -> str | None:
    """Evaluate an arithmetic expression; the result as text, or None if it is rejected or fails. Never raises."""
    try:
        if not isinstance(expression, str) or len(expression) > MAX_INPUT_CHARS:
            return None
        expression = expression.strip()
        if not expression:
            return None
        with warnings.catch_warnings():  # e.g. "invalid escape sequence" from a string literal we reject anyway
            warnings.simplefilter("ignore")
            tree = ast.parse(expression, mode="eval")
        text = format_number(_evaluate(tree))
        return text if len(text) <= MAX_OUTPUT_CHARS else None
    except Exception:  # SyntaxError, ZeroDivisionError, OverflowError, RecursionError, MemoryError, _Rejected ...
        return None
