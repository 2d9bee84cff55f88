"""The grader is total (issue 17, item 3): every path that grades a completion — the RL reward (what
scripts/chat_rl.py builds and reasoning.rollout calls), the eval grading of every task
(reasoning.evaluation.grade_completion) and maj@k's answer classes — returns within a bounded time and never raises,
whatever the string."""

import json
import time

import pytest

from reasoning import grader_pool
from reasoning.eval_metrics import answer_classes
from reasoning.evaluation import grade_completion
from reasoning.rewards import Completion
from scripts.chat_rl import RLConfig, build_reward
from reasoning.verifiers import extract_answer, math_equal
from tasks.customjson import CustomJSON
from tasks.math import MathProblems
from tasks.synthetic import SyntheticReasoning

BOUND_S = 3.0  # the promise under load (the worker timeout is 1.5 s)


def _nested(opening: str, closing: str, depth: int, core: str = "1") -> str:
    return opening * depth + core + closing * depth


PATHOLOGICAL = {}
for _depth in (1000, 5000):
    PATHOLOGICAL[f"boxed nested {_depth}"] = _nested("\\boxed{", "}", _depth)
    PATHOLOGICAL[f"boxed unclosed {_depth}"] = "\\boxed{" * _depth + "1"
    PATHOLOGICAL[f"frac nested {_depth}"] = "\\boxed{" + _nested("\\frac{", "}{2}", _depth) + "}"
    PATHOLOGICAL[f"braces nested {_depth}"] = "\\boxed{" + _nested("{", "}", _depth) + "}"
    PATHOLOGICAL[f"text nested {_depth}"] = "\\boxed{" + _nested("\\text{", "}", _depth, "a") + "}"
    PATHOLOGICAL[f"sqrt chain {_depth}"] = "\\boxed{" + "\\sqrt" * _depth + "2}"
PATHOLOGICAL.update({
    "100k-char box": "\\boxed{" + "1+" * 50_000 + "1}",
    "100k digits": "\\boxed{" + "9" * 100_000 + "}",
    "100k plain": "x" * 100_000,
    "100k answer phrases": "The answer is " * 7_000 + "5",
    "100k backslashes": "\\" * 100_001,
    "100k bare boxes": "\\boxed " * 15_000,
    "unbalanced closers": "\\boxed{" + "}" * 1000 + "{" * 1000,
    "unbalanced openers": "\\boxed{1}" + "{" * 5000,
    "unicode": "\\boxed{π√∞−5\u00a0😀 ∑ 𝔸}",
    "NUL bytes": "\\boxed{5\x00}\x00\x00",
    "lone surrogate": "\\boxed{5\ud800}",
    "think markers only": "<|think_start|>" * 5000 + "\\boxed{5}",
    "trailing line breaks": "\\boxed{5" + " \\\\" * 30_000 + "}",
})


@pytest.fixture(scope="module", autouse=True)
def grader():
    grader_pool.warm_up_grader()  # worker start-up is not part of any pair's bound
    yield


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def eval_tasks(tmp_path_factory):
    """One task per grading convention, each with an example whose gold answer is 5 (synthetic: its own)."""
    path = tmp_path_factory.mktemp("custom") / "custom.jsonl"
    path.write_text(json.dumps({"problem": "2+3?", "thinking": "2+3=5", "answer": "5"}) + "\n")
    tasks = {"MATH": MathProblems([{"problem": "2+3?", "solution": "\\boxed{5}", "answer": "5"}], "MATH", "test"),
             "customjson": CustomJSON(str(path)),
             "synthetic": SyntheticReasoning("test", size=1, seed=0)}
    return {name: (task, task[0]) for name, task in tasks.items()}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_extraction_and_equality_are_total(name):
    text = PATHOLOGICAL[name]
    for fn, args in [(extract_answer, (text, True)), (extract_answer, (text, False)),
                     (math_equal, ("5", text)), (math_equal, (text, "5")), (math_equal, (text, text))]:
        _, elapsed = _timed(fn, *args)
        assert elapsed < BOUND_S, f"{fn.__name__}: {elapsed:.2f}s"


def test_the_rl_reward_is_total():
    """The whole pathological set as one rollout batch through the reward chat_rl builds (with the overlong term)."""
    reward = build_reward(RLConfig(overlong_buffer=4, max_new_tokens=16))
    texts = list(PATHOLOGICAL.values())
    for think_closed in (None, True):  # raw text with markers, and the visible part only
        completions = [Completion(text=t, think_closed=think_closed, num_tokens=8) for t in texts]
        breakdown, elapsed = _timed(reward, completions, [{"answer": "5"}] * len(texts))
        assert len(breakdown.total) == len(texts)
        # every completion is judged on its own bound (the workers run the sympy-bound ones in parallel)
        assert elapsed < BOUND_S * len(texts), f"{elapsed:.1f}s for {len(texts)} completions"
        assert all(v in (0.0, 1.0) for v in breakdown.parts["correctness"])


def test_the_rl_reward_bounds_each_completion():
    reward = build_reward(RLConfig())
    for name, text in PATHOLOGICAL.items():
        _, elapsed = _timed(reward, [Completion(text=text, num_tokens=8)], [{"answer": "5"}])
        assert elapsed < BOUND_S, f"{name}: {elapsed:.2f}s"


@pytest.mark.parametrize("task_name", ["MATH", "customjson", "synthetic"])
def test_eval_grading_is_total(eval_tasks, task_name):
    task, example = eval_tasks[task_name]
    for name, text in PATHOLOGICAL.items():
        graded, elapsed = _timed(grade_completion, task, example, text)
        assert graded["correct"] in (True, False)
        assert elapsed < BOUND_S, f"{task_name} / {name}: {elapsed:.2f}s"


def test_majority_classes_are_total():
    answers = [extract_answer(t, strict=False) for t in PATHOLOGICAL.values()] + ["5", "5.0"]
    classes, elapsed = _timed(answer_classes, answers)
    assert len(classes) == len(answers) and classes[-1] == classes[-2]  # the grader still works after the set
    assert elapsed < BOUND_S * len(answers)


def test_deeply_boxed_answer_is_unwrapped():
    """Behaviour, not just survival: a correct answer inside 5000 redundant boxes is still that answer."""
    assert extract_answer(_nested("\\boxed{", "}", 5000, "42")) == "42"
    assert extract_answer(_nested("\\boxed{", "}", 5000, "42") + " then \\boxed{7}") == "7"
    assert extract_answer("\\boxed{" * 5000 + "42") is None  # truncated: unclosed


# -------------------------------------------------------------------- normalisation without recursion: parity

def _reference_brace_macro_args(s: str, macro: str, nargs: int) -> str:
    """The recursive rewrite that verifiers._brace_macro_args replaced (RecursionError ~1000 arguments deep)."""
    import re

    from reasoning.verifiers import _match_brace

    def brace_arg(s, pos):
        while pos < len(s) and s[pos] == " ":
            pos += 1
        if pos >= len(s) or s[pos] == "}":
            return None
        if s[pos] == "{":
            close = _match_brace(s, pos)
            return None if close < 0 else (s[pos + 1:close], close + 1)
        if s[pos] == "\\":
            cmd = re.match(r"\\[a-zA-Z]+|\\.", s[pos:]).group(0)
            return cmd, pos + len(cmd)
        return s[pos], pos + 1

    out, pos = [], 0
    pattern = re.compile(re.escape(macro) + r"(?![a-zA-Z])")
    while (match := pattern.search(s, pos)) is not None:
        out.append(s[pos:match.end()])
        pos = match.end()
        if macro == "\\sqrt" and s[pos:pos + 1] == "[":
            close = s.find("]", pos)
            if close < 0:
                break
            out.append(s[pos:close + 1])
            pos = close + 1
        for _ in range(nargs):
            arg = brace_arg(s, pos)
            if arg is None:
                break
            out.append("{" + _reference_brace_macro_args(arg[0], macro, nargs) + "}")
            pos = arg[1]
    out.append(s[pos:])
    return "".join(out)


def test_macro_argument_rewrite_matches_the_recursive_reference():
    import random

    from reasoning.verifiers import _brace_macro_args

    pieces = ["\\frac", "\\sqrt", "\\dfrac", "{", "}", "{", "}", "1", "2", "x", " ", "[", "]", "\\pi", "\\{", "\\}",
              "^", "_", "(", ","]
    rng = random.Random(0)
    compared = 0
    for _ in range(4000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        for macro, nargs in (("\\frac", 2), ("\\sqrt", 1)):
            try:
                want = _reference_brace_macro_args(s, macro, nargs)
            except AttributeError:  # the reference's crash on a lone trailing backslash
                continue
            assert _brace_macro_args(s, macro, nargs) == want, (s, macro)
            compared += 1
    assert compared > 7000


def test_macro_argument_rewrite_is_linear_at_any_depth():
    from reasoning.verifiers import _brace_macro_args, normalize_answer

    deep = "\\frac{" * 5000 + "1" + "}{2}" * 5000
    _, elapsed = _timed(_brace_macro_args, deep, "\\frac", 2)
    assert elapsed < BOUND_S
    roots = "\\sqrt{" * 3000 + "\\sqrt2" + "}" * 3000
    rewritten, elapsed = _timed(_brace_macro_args, roots, "\\sqrt", 1)
    assert elapsed < BOUND_S and rewritten == "\\sqrt{" * 3000 + "\\sqrt{2}" + "}" * 3000
    for text in PATHOLOGICAL.values():  # the public normaliser is total too
        _, elapsed = _timed(normalize_answer, text)
        assert elapsed < BOUND_S
