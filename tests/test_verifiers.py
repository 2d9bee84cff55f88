"""Tests for reasoning/verifiers.py and its worker pool (reasoning/grader_pool.py): extraction, equivalence table,
MATH-500 self-grade, time bounds. The rewards built on them are tested in tests/test_rewards.py."""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from reasoning import grader_pool
from reasoning.verifiers import extract_answer, math_equal, math_equal_batch, normalize_answer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MATH500 = SHARED_DATA / "math500_test.json"
GSM8K_TEST = SHARED_DATA / "gsm8k_test.jsonl"
TIME_BOUND_S = 2.0  # the promise for pathological answers at the default 1.5 s timeout
# Correctness tables get a generous per-pair bound: on a loaded 2-core box a legitimate sympy comparison can
# exceed 1.5 s wall-clock, and these tests are about verdicts, not time (the time-bound tests use the default).
VERDICT_TIMEOUT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def grader():
    grader_pool.warm_up_grader()  # worker start-up is never charged to a pair, but keep it out of the timings below
    yield


# ------------------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize("text, strict, expected", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", True, "\\frac{1}{2}"),
    ("nested \\boxed{\\left(\\frac{a}{b^{2}}, \\{1\\}\\right)} done", True, "\\left(\\frac{a}{b^{2}}, \\{1\\}\\right)"),
    ("first \\boxed{1}, then \\boxed{2}", True, "2"),
    ("\\fbox{7}", True, "7"),
    ("first \\boxed{1} then \\fbox{8}", True, "8"),
    ("$\\boxed 5$.", True, "5"),
    ("\\boxed{\\boxed{3}}", True, "3"),
    ("\\boxed{\\{1,2\\}}", True, "\\{1,2\\}"),
    ("\\boxed{1} and then \\boxed{\\frac{1}{2}", True, None),       # the last box is unclosed: truncated
    ("\\boxed{1} and then \\boxed{\\frac{1}{2}", False, None),
    ("\\boxed{ }", True, None),
    ("\\boxedx{3}", True, None),                                     # not a box command
    ("The answer is 5.", True, None),                                # strict needs a box
    ("The answer is 5.", False, "5"),
    ("The final answer is: $\\frac{3}{4}$. I hope", False, "\\frac{3}{4}"),
    ("Answer: 3.5. Done", False, "3.5"),
    ("steps...\n#### 1,234", True, None),
    ("steps...\n#### 1,234", False, "1,234"),
    ("\\boxed{3}\n#### 4", False, "3"),                              # a box beats the fallbacks
    ("no answer here", False, None),
    (None, False, None),
])
def test_extract_answer(text, strict, expected):
    assert extract_answer(text, strict=strict) == expected


def test_extract_answer_gsm8k_gold_lines():
    if not GSM8K_TEST.exists():
        pytest.skip(f"{GSM8K_TEST} not found (../shared/data is only on developer machines)")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    for row in rows:
        expected = row["answer"].rsplit("####", 1)[1].strip()
        assert extract_answer(row["answer"], strict=False) == expected
        assert extract_answer(row["answer"], strict=True) is None


def test_extraction_is_linear_on_huge_completions():
    text = "\\boxed{1} " * 20_000 + "\\boxed{42}"  # ~200 KB, 20k boxes
    start = time.perf_counter()
    assert extract_answer(text) == "42"
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------------- equivalence

EQUIVALENT = [
    # fractions
    ("\\frac{1}{2}", "0.5"), ("\\frac12", "\\frac{1}{2}"), ("\\dfrac{3}{4}", "\\frac{3}{4}"), ("\\tfrac{3}{4}", "3/4"),
    ("\\frac{14}{3}", "\\frac{28}{6}"), ("1\\frac{4}{5}", "\\frac{9}{5}"), ("137 \\frac{1}{2}", "137.5"),
    ("\\frac{1}{3}", "0.333333"), ("-\\frac{35}{9}", "\\frac{-35}{9}"), ("\\frac 59", "5/9"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    # radicals
    ("2\\sqrt{2}", "\\sqrt{8}"), ("11\\sqrt2", "11\\sqrt{2}"), ("3\\sqrt{13}", "\\sqrt{117}"), ("√2", "\\sqrt{2}"),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}"),
    # pi and infinity
    ("\\pi", "π"), ("288 \\pi", "288\\pi"), ("\\frac{\\pi}{2}", "\\pi/2"), ("18+2\\pi", "2\\pi+18"),
    ("(2,\\infty)", "(2, \\infty)"), ("(-\\infty, 0]", "(-∞,0]"), ("(5,\\infty)", "(5, inf)"),
    # intervals, sets, tuples
    ("(3,4]", "(3, 4]"), ("\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(0.6, 8/3]"),
    ("(0,9) \\cup (9,36)", "(9,36)\\cup(0,9)"), ("x \\in [-2,7]", "[-2,7]"),
    ("1,-2", "-2, 1"), ("3, 5, 7", "7,3,5"), ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1+\\sqrt{5}, 1-\\sqrt{5}"),
    ("(2,4)", "2, 4"), ("(6,31,-1)", "(6, 31, -1)"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"), ("(15,-29)", "(15, -29)"),
    # matrices
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac13 \\\\ \\frac{2}{3} \\\\ \\frac53 \\end{pmatrix}"),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", "\\begin{bmatrix} -2 \\\\ -14 \\\\ -7 \\end{bmatrix}"),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{bmatrix}-1&0\\\\0&-1\\end{bmatrix}"),
    # degrees and units
    ("90^\\circ", "90"), ("145^\\circ", "145^{\\circ}"), ("30^\\circ", "30 degrees"), ("30^\\circ", "30°"),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"), ("864 \\mbox{ inches}^2", "864"),
    ("15\\mbox{ cm}^2", "15 \\text{ cm}^2"), ("5.4 \\text{ cents}", "5.4"), ("5", "5 \\text{ cm}"),
    ("12", "12 square feet"),
    # dollars, percent, thousands separators
    ("\\$32,\\!348", "32348"), ("\\$18.90", "18.9"), ("\\$36", "36 dollars"), ("36", "\\$36.00"),
    ("50\\%", "50"), ("25", "25\\%"), ("10,\\!080", "10080"), ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
    ("58,500", "58500"), ("1000", "1,000"),
    # scientific notation and decimals
    (".0000672", "6.72\\times 10^{-5}"), ("0.0000672", "6.72e-5"), ("1.25", "\\frac{5}{4}"), ("0.15", ".15"),
    ("2.5", "2.50000001"),
    # x= prefixes
    ("x=5", "5"), ("5", "x = 5"), ("y = 2x + 3", "2x+3"), ("y = -2x", "y=-2x"), ("f(x) = x^2", "x^2"),
    # text answers and multiple choice
    ("\\text{(C)}", "C"), ("\\text{(E)}", "(E)"), ("\\text{(B)}", "\\textbf{(B)}"), ("\\text{Evelyn}", "Evelyn"),
    ("\\text{east}", "East"), ("Monday", "\\text{Monday}"), ("\\text{ellipse}", "ellipse."),
    # bases, algebra, complex numbers
    ("52_8", "52_{8}"), ("52_8", "52"), ("4210_{5}", "4210_5"), ("p - q", "-q + p"),
    ("x^3+3x-6", "3x + x^3 - 6"), ("\\cot x", "\\frac{\\cos x}{\\sin x}"), ("6 - 5i", "-5i + 6"),
    ("2k+2", "2(k+1)"), ("\\boxed{5}", "5"),
    # LaTeX layout around the value (issue 17): line breaks at either end, spacing commands
    ("7", "7 \\\\"), ("7", "7\\\\"), ("7", "\\\\ 7"), ("7", "7 \\\\[2pt]"), ("7", "7\\newline"), ("7", "7\\ "),
    ("7", "7 \\quad"), ("7", "\\qquad 7"), ("x = 7 \\quad", "7"), ("7", "7\\hspace{1em}"), ("7", "7\\enspace"),
    ("\\frac{1}{2}", "\\frac{1}{2} \\\\"), ("(0,1]", "\\\\ (0, 1]"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\\\ \\end{pmatrix}"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{3}", "0.33"), ("\\frac{1}{3}", "0.3333"), ("2\\sqrt{2}", "2\\sqrt{3}"), ("\\pi", "3.14"),
    ("(2,4)", "[2,4]"), ("(2,4)", "(4,2)"), ("(2,4)", "4, 2"), ("(6,31,-1)", "(-1,31,6)"), ("(3,4]", "[3,4]"),
    ("(-\\infty, 0]", "(-\\infty, 0)"), ("\\infty", "-\\infty"), ("1,2", "12"), ("1,000", "1"), ("10", "1,0"),
    ("3, 5, 7", "3, 5"), ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}"),
    ("50\\%", "0.5"), ("90^\\circ", "91"), ("13535", "13536"), ("11111111100", "11111111101"),
    ("\\text{(C)}", "D"), ("\\text{Evelyn}", "Navin"), ("\\text{even}", "odd"), ("52_8", "52_9"), ("52_8", "42"),
    ("x^3+3x-6", "x^3+3x+6"), ("p - q", "q - p"), ("6 - 5i", "6 + 5i"), ("2k+2", "2k+1"),
    ("\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("6.72\\times 10^{-5}", "6.72\\times 10^{-6}"), ("x=5", "6"), ("5", ""), ("5", "\\text{five}"),
    ("0", "0.000001"), ("1.25", "1.26"), ("\\frac{\\pi}{2}", "\\frac{\\pi}{3}"), ("-2", "2"),
    ("\\$18.90", "18.09"), ("3\\sqrt{13}", "13\\sqrt{3}"), ("\\frac{9}{256}", "\\frac{9}{265}"), ("5", "5 x"),
    ("7", "\\begin{pmatrix} 7 \\\\ 8 \\end{pmatrix}"), ("[0,1]", "\\\\ (0,1)"), ("7", "7 \\\\ 8, 9"),
]


def test_table_is_large_enough():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 80


def test_equivalence_table():
    pairs = EQUIVALENT + NOT_EQUIVALENT
    expected = [True] * len(EQUIVALENT) + [False] * len(NOT_EQUIVALENT)
    got = math_equal_batch(pairs, timeout=VERDICT_TIMEOUT_S)
    wrong = [(gold, pred, want) for (gold, pred), want, have in zip(pairs, expected, got) if have != want]
    assert not wrong, f"misgraded (gold, pred, expected): {wrong}"


def test_single_calls_agree_with_batch():
    pairs = EQUIVALENT[::9] + NOT_EQUIVALENT[::7]
    singles = [math_equal(gold, pred, timeout=VERDICT_TIMEOUT_S) for gold, pred in pairs]
    assert singles == math_equal_batch(pairs, timeout=VERDICT_TIMEOUT_S)


@pytest.mark.parametrize("bad", [None, 5, b"5", ["5"]])
def test_non_strings_are_false_not_errors(bad):
    assert math_equal("5", bad) is False
    assert math_equal(bad, "5") is False


def test_bad_timeout_is_an_api_error():
    with pytest.raises(ValueError, match="timeout"):
        math_equal("1", "1", timeout=0)


# --------------------------------------------------------------------------------- MATH-500 self-grade

def _math500():
    if not MATH500.exists():
        pytest.skip(f"{MATH500} not found (../shared/data is only on developer machines)")
    return json.loads(MATH500.read_text())


def test_normalisation_is_idempotent_on_math500_answers():
    for row in _math500():
        once = normalize_answer(row["answer"])
        assert normalize_answer(once) == once, row["answer"]


def test_math500_self_grade():
    """Each gold solution's last box must grade equal to its answer field (failures go to dev/LOG.md)."""
    rows = _math500()
    pairs = [(row["answer"], extract_answer(row["solution"], strict=True)) for row in rows]
    verdicts = math_equal_batch(pairs, timeout=VERDICT_TIMEOUT_S)
    failures = [(row["unique_id"], gold, pred) for row, (gold, pred), ok in zip(rows, pairs, verdicts) if not ok]
    assert sum(verdicts) / len(rows) >= 0.995, failures


def test_math500_shuffled_pairing_is_rejected():
    """Sanity: a grader that says yes to everything would pass the self-grade."""
    rows = _math500()
    preds = [extract_answer(row["solution"]) for row in rows]
    random.Random(0).shuffle(preds)
    verdicts = math_equal_batch([(row["answer"], pred) for row, pred in zip(rows, preds)], timeout=VERDICT_TIMEOUT_S)
    # the few hits must be genuine coincidences (the same answer text for different problems)
    hits = [(row["answer"], pred) for row, pred, ok in zip(rows, preds, verdicts) if ok]
    assert len(hits) / len(rows) < 0.05
    assert all(normalize_answer(gold) == normalize_answer(pred) for gold, pred in hits), hits


# --------------------------------------------------------------------------------------- time bounds

PATHOLOGICAL = {  # the first two pass every cheap pre-check and must be stopped by the worker timeout
    "power tower 10^10^10": "10^{10^{10}}",
    "power tower 9^9^9^9": "9^{9^{9^{9}}}",
    "10k nested braces": "{" * 10_000 + "1" + "}" * 10_000,
    "100 KB string": "1+" * 50_000 + "1",
    "deep fraction": "\\frac{" * 500 + "1" + "}{2}" * 500,
}


def _grade_timed(gold, pred, **kwargs):
    start = time.perf_counter()
    result = math_equal(gold, pred, **kwargs)
    return result, time.perf_counter() - start


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_main_thread(name):
    result, elapsed = _grade_timed("5", PATHOLOGICAL[name])
    assert result is False
    assert elapsed < TIME_BOUND_S, f"{name}: {elapsed:.2f}s"


def test_pathological_gold_is_bounded_too():
    result, elapsed = _grade_timed("9^{9^{9^{9}}}", "5")
    assert result is False and elapsed < TIME_BOUND_S


def test_pathological_from_worker_thread():
    """math-verify's own SIGALRM timeout cannot work off the main thread; ours must."""
    outcomes = {}

    def grade_all():
        for name, text in PATHOLOGICAL.items():
            outcomes[name] = _grade_timed("5", text)
        outcomes["sane"] = _grade_timed("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}")

    thread = threading.Thread(target=grade_all)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert outcomes.pop("sane")[0] is True
    for name, (result, elapsed) in outcomes.items():
        assert result is False and elapsed < TIME_BOUND_S, (name, result, elapsed)


def test_timeout_kills_the_worker_and_the_pool_recovers():
    kills_before = grader_pool.get_pool().kills
    result, elapsed = _grade_timed("5", "10^{10^{10}}", timeout=0.5)  # a custom bound is honoured
    assert result is False and elapsed < 1.0
    assert grader_pool.get_pool().kills == kills_before + 1
    assert math_equal("x+1", "1+x") is True


def test_concurrent_callers_on_threads():
    pairs = [("x+1", "1+x", True), ("5", "10^{10^{10}}", False), ("\\sqrt{8}", "2\\sqrt{2}", True),
             ("p-q", "q-p", False)]
    results = [None] * len(pairs)

    def grade(i):
        results[i] = math_equal(pairs[i][0], pairs[i][1])

    threads = [threading.Thread(target=grade, args=(i,)) for i in range(len(pairs))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [want for _, _, want in pairs]
    assert time.perf_counter() - start < 10.0


def test_batch_with_a_slow_pair_grades_the_rest():
    # 3 s: long enough for ordinary sympy comparisons on a loaded 2-core box, far below the tower's runtime
    pairs = [("x+1", "1+x"), ("5", "9^{9^{9^{9}}}"), ("\\sqrt{8}", "2\\sqrt{2}"), ("2k+2", "2(k+1)")]
    assert math_equal_batch(pairs, timeout=3.0) == [True, False, True, True]


def test_dead_workers_are_replaced():
    pool = grader_pool.get_pool()
    victim = next(w for w in pool._all if w.ready)
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.join(timeout=5)
    size = len(pool._all)
    pairs = [("x+1", "1+x"), ("\\sqrt{8}", "2\\sqrt{2}"), ("p-q", "q-p")] * 2
    assert math_equal_batch(pairs, timeout=VERDICT_TIMEOUT_S) == [True, True, False] * 2
    assert victim not in pool._all and len(pool._all) == size
