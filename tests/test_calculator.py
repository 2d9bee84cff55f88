"""The calculator tool: right answers on arithmetic, None (never an exception) on anything else, always fast."""

import random
import time

import pytest

from reasoning.calculator import MAX_INPUT_CHARS, calculate


@pytest.mark.parametrize("expression, expected", [
    ("2+3", "5"),
    ("  2 + 3 * 4 ", "14"),
    ("(2+3)*4", "20"),
    ("7/2", "3.5"),
    ("6/3", "2"),           # whole floats read as ints
    ("7//2", "3"),
    ("-7//2", "-4"),
    ("7%3", "1"),
    ("-7 % 3", "2"),
    ("2**10", "1024"),
    ("2**-2", "0.25"),
    ("-3", "-3"),
    ("+3", "3"),
    ("--3", "3"),
    ("1/3", "0.3333333333"),
    ("0.1+0.2", "0.3"),
    ("1.5e3", "1500"),
    ("1_000 * 3", "3000"),
    ("10**100", "1" + "0" * 100),
    ("123456789 * 987654321", str(123456789 * 987654321)),
    ("2**0.5", "1.414213562"),
    ("3 > 2", "True"),
    ("1 < 2 < 3", "True"),
    ("2 == 3", "False"),
    ("1e-5 * 3", "3e-05"),
])
def test_correct_results(expression, expected):
    assert calculate(expression) == expected


def test_matches_python_on_random_integer_expressions():
    """Cross-check against Python's own arithmetic on random well-formed expressions (the reference)."""
    rng = random.Random(0)
    for _ in range(300):
        a, b, c = (rng.randint(-999, 999) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expression = f"{a} {op1} ({b} {op2} {c})"
        assert calculate(expression) == str(eval(expression, {"__builtins__": {}}))  # trusted, test-made text


@pytest.mark.parametrize("expression", [
    "__import__('os')",
    "__import__('os').system('echo hacked')",
    "().__class__.__bases__[0].__subclasses__()",
    "x",
    "x + 1",
    "abs(-3)",
    "print(1)",
    "(1).real",
    "[1, 2][0]",
    "'a' * 3",
    "b'1'",
    "1j",
    "True + 1",
    "None",
    "lambda: 1",
    "[i for i in range(10)]",
    "1; 2",
    "a = 1",
    "1 if 2 else 3",
    "1 and 2",
    "~1",
    "1 << 1000",
    "1 & 2",
    "9**9**9",            # would take forever and exhaust memory if computed
    "10**101",
    "2**1000",
    "(10**50)*(10**51)",
    "1e308*10",
    "1e400",
    "(-8)**0.5",          # complex
    "0.1**-200",
    "1/0",
    "1//0",
    "1%0",
    "0**-1",
    "",
    "   ",
    "2 +",
    "((((",
    "1 " * 50,
])
def test_rejected(expression):
    assert calculate(expression) is None


@pytest.mark.parametrize("value", [None, 12, 3.5, b"1+1", ["1+1"]])
def test_non_string_input_is_rejected(value):
    assert calculate(value) is None


def test_long_inputs_rejected_quickly():
    huge_inputs = ["1+" * 5000 + "1", "(" * 10_000, "9" * 10_000, "-" * 10_000 + "1", "9**" * 3000 + "9"]
    start = time.perf_counter()
    for text in huge_inputs:
        assert calculate(text) is None
    assert time.perf_counter() - start < 0.05  # measured ~5 µs; the bound leaves room for a loaded CI box
    # right at the limit it still evaluates, just past it is rejected
    at_limit = "1+" * ((MAX_INPUT_CHARS - 1) // 2) + "1"
    assert len(at_limit) <= MAX_INPUT_CHARS and calculate(at_limit) == str((MAX_INPUT_CHARS - 1) // 2 + 1)
    assert calculate(at_limit + "+1" * 10) is None


def test_worst_case_inputs_within_the_limit_are_fast():
    nasty = ["(" * 99 + "1" + ")" * 99, "-" * 199 + "1", "9**" * 66 + "9", "99**99", "(10**99)//3 % 7 * 10**99",
             "1" * 100 + "*" + "1" * 99]
    start = time.perf_counter()
    for text in nasty:
        assert len(text) <= MAX_INPUT_CHARS
        calculate(text)  # must simply return, whatever the result
    assert time.perf_counter() - start < 0.25  # measured ~1.2 ms


def test_never_raises_on_random_garbage():
    rng = random.Random(1)
    alphabet = "0123456789+-*/%().eE_ jx'\"[]{}<>=!~&|^,:;@\\\n\t"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        result = calculate(text)
        assert result is None or isinstance(result, str)
