"""Synthetic reasoning problems: answers re-derived independently, determinism, split disjointness, knobs,
the Task wrapper's grading, and the offline parquet corpus."""

import ast
import os
import random
import re
import sys
from fractions import Fraction

import pyarrow.parquet as pq
import pytest

from tasks.synthetic import (DIFFICULTY, INSTRUCTION, SyntheticReasoning, computation_key, make_problem,
                             parse_integer, split_of, write_synthetic_corpus)

STEP_RE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")
EXPRESSION_RE = re.compile(r"^(?:Compute|What is|Evaluate|Calculate|Find the value of) (.+)[.?]$")
WORD_NUMBERS = {"twice": 2, "three times": 3, "four times": 4, "five times": 5, "half": 2, "a third": 3,
                "a quarter": 4, "a fifth": 5, "a tenth": 10}


def check_step(line):
    """Re-evaluate 'a op b = c' with Fractions (not the generator's code); returns (a, op, b, c)."""
    match = STEP_RE.match(line)
    assert match, f"step {line!r} is not 'a op b = c'"
    a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
    assert not (op == "/" and b == 0), f"division by zero in {line!r}"
    exact = Fraction(a, b) if op == "/" else Fraction({"+": a + b, "-": a - b, "*": a * b}[op])
    assert exact == c, f"wrong step {line!r}"
    return a, op, b, c


def eval_expression_postorder(text):
    """Evaluate an expression with Python's own parser; returns (value, post-order steps as strings)."""
    steps = []

    def walk(node):
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        assert isinstance(node, ast.BinOp), ast.dump(node)
        left, right = walk(node.left), walk(node.right)
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
        assert not (op == "/" and right == 0), f"division by zero in {text!r}"
        value = left / right if op == "/" else {"+": left + right, "-": left - right, "*": left * right}[op]
        assert value.denominator == 1 and value >= 0, f"non-integer or negative intermediate in {text!r}"
        steps.append(f"{left} {op} {right} = {value}")
        return value

    return walk(ast.parse(text, mode="eval").body), steps


def check_problem(p, num_steps, max_operand):
    assert len(p["steps"]) == num_steps
    results = [check_step(line) for line in p["steps"]]
    assert str(results[-1][3]) == p["answer"]
    lines = p["solution"].split("\n")
    assert lines[:-1] == p["steps"]
    assert lines[-1] == f"The answer is \\boxed{{{p['answer']}}}."
    assert all(0 <= c <= max_operand ** 2 for *_, c in results)
    if p["kind"] == "expression":
        expression = EXPRESSION_RE.match(p["problem"])[1]
        value, steps = eval_expression_postorder(expression)
        assert str(value) == p["answer"] and steps == p["steps"]
        assert all(1 <= int(n) <= max_operand for n in re.findall(r"\d+", expression))
    else:
        # a story: each step continues from the previous result with an operand the text states
        numbers = {int(n) for n in re.findall(r"\d+", p["problem"])}
        numbers |= {v for word, v in WORD_NUMBERS.items() if word in p["problem"]}
        assert results[0][0] in numbers
        for prev, cur in zip(results, results[1:]):
            assert cur[0] == prev[3]
        assert all(b in numbers and b <= max_operand for _, _, b, _ in results)


@pytest.mark.parametrize("kind", ["expression", "word"])
def test_problems_are_correct_for_every_step_count(kind):
    rng = random.Random(0)
    for num_steps in range(1, 7):
        for max_operand in (5, 12, 50):
            for _ in range(40):
                p = make_problem(rng, num_steps, max_operand, kind=kind)
                assert p["kind"] == kind
                check_problem(p, num_steps, max_operand)


def test_problems_are_varied():
    rng = random.Random(1)
    problems = [make_problem(rng, 3, 20) for _ in range(500)]
    assert len({p["problem"] for p in problems}) > 490
    ops = {line.split(" ")[1] for p in problems for line in p["steps"]}
    assert ops == set("+-*/")
    assert {p["kind"] for p in problems} == {"expression", "word"}
    openings = {p["problem"].split(" ")[1] for p in problems if p["kind"] == "word"}
    assert len(openings) >= 8  # many templates, not one story with different numbers


def test_determinism_under_seed():
    first = [make_problem(random.Random(7), 3, 20) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert make_problem(random.Random(8), 3, 20) != first[0]
    a, b = SyntheticReasoning("train", 50, seed=3), SyntheticReasoning("train", 50, seed=3)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    c = SyntheticReasoning("train", 50, seed=4)
    assert [a[i]["problem"] for i in range(50)] != [c[i]["problem"] for i in range(50)]
    # random access does not depend on what was generated before
    assert a[17] == SyntheticReasoning("train", 50, seed=3)[17]


def test_train_and_test_are_disjoint_by_construction():
    train = SyntheticReasoning("train", 3000, seed=0, difficulty="medium")
    test = SyntheticReasoning("test", 3000, seed=0, difficulty="medium")
    train_problems = [train[i] for i in range(len(train))]
    test_problems = [test[i] for i in range(len(test))]

    def keys(examples):
        return {computation_key(ex["messages"][1]["content"][0]["text"].split("\n")) for ex in examples}

    assert not {ex["problem"] for ex in train_problems} & {ex["problem"] for ex in test_problems}
    assert not keys(train_problems) & keys(test_problems)
    assert all(split_of(k) == "test" for k in keys(test_problems))
    # the split is a hash share, not a degenerate one
    rng = random.Random(0)
    share = sum(make_problem(rng, 2, 20)["split"] == "test" for _ in range(2000)) / 2000
    assert 0.05 < share < 0.16


def test_computation_key_ignores_commutative_order():
    assert computation_key(["3 * 22 = 66"]) == computation_key(["22 * 3 = 66"])
    assert computation_key(["3 + 4 = 7", "7 - 2 = 5"]) == computation_key(["4 + 3 = 7", "7 - 2 = 5"])
    assert computation_key(["9 - 2 = 7"]) != computation_key(["2 - 9 = -7"])
    assert split_of("3+4") == split_of("3+4")
    with pytest.raises(ValueError, match="computation key"):
        split_of("Compute 3 + 4.")  # problem text does not decide the split; refuse instead of guessing


def test_knobs_change_difficulty():
    stats = {}
    for name in ("easy", "medium", "hard"):
        task = SyntheticReasoning("train", 300, seed=0, difficulty=name)
        lo, hi = DIFFICULTY[name]["num_steps"]
        steps = [task[i]["num_steps"] for i in range(len(task))]
        assert min(steps) == lo and max(steps) == hi
        for i in range(len(task)):
            think = task[i]["messages"][1]["content"][0]["text"].split("\n")
            assert len(think) == task[i]["num_steps"]
        answers = [int(task[i]["answer"]) for i in range(len(task))]
        stats[name] = (sum(steps) / len(steps), sum(answers) / len(answers))
    assert stats["easy"][0] < stats["medium"][0] < stats["hard"][0]
    assert stats["easy"][1] < stats["medium"][1] < stats["hard"][1]
    fixed = SyntheticReasoning("train", 50, num_steps=5, max_operand=7)
    assert all(fixed[i]["num_steps"] == 5 for i in range(50))
    assert all(int(n) <= 7 for i in range(50) for n in re.findall(r"\d+", fixed[i]["problem"]) if fixed[i]["kind"] == "expression")


def test_bad_arguments_raise_value_error():
    rng = random.Random(0)
    for kwargs in (dict(num_steps=0, max_operand=10), dict(num_steps=7, max_operand=10),
                   dict(num_steps=2, max_operand=1), dict(num_steps=2, max_operand=10, kind="poem"),
                   dict(num_steps=2, max_operand=10, split="val")):
        with pytest.raises(ValueError):
            make_problem(rng, **kwargs)
    with pytest.raises(ValueError, match="split"):
        SyntheticReasoning("validation")
    with pytest.raises(ValueError, match="difficulty"):
        SyntheticReasoning(difficulty="impossible")
    with pytest.raises(ValueError, match="num_steps"):
        SyntheticReasoning(num_steps=(3, 2))


def test_task_examples_and_grading():
    task = SyntheticReasoning("test", 40, seed=0)
    assert len(task) == 40 and len(task[10:20]) == 10
    for i in range(len(task)):
        ex = task[i]
        user, assistant = ex["messages"]
        assert user["role"] == "user" and user["content"] == f"{ex['problem']}\n{INSTRUCTION}"
        think, text = assistant["content"]
        assert think["type"] == "think" and text["type"] == "text"
        assert text["text"] == f"The answer is \\boxed{{{ex['answer']}}}."
        gold = think["text"] + "\n" + text["text"]
        wrong = int(ex["answer"]) + 1
        assert task.evaluate(ex, gold)
        assert task.reward(ex, gold) == 1.0
        assert not task.evaluate(ex, gold.replace(f"\\boxed{{{ex['answer']}}}", f"\\boxed{{{wrong}}}"))
        assert task.reward(ex, f"\\boxed{{{wrong}}}") == 0.0
        assert not task.evaluate(ex, f"The answer is {ex['answer']}.")  # no box, no credit
        # the last box counts, an earlier wrong one does not
        assert task.evaluate(ex, f"maybe \\boxed{{{wrong}}}, no: \\boxed{{{ex['answer']}}}")
        assert not task.evaluate(ex, f"\\boxed{{{ex['answer']}}} or rather \\boxed{{{wrong}}}")


def test_parse_integer():
    assert parse_integer(" 1,234 ") == 1234
    assert parse_integer("$42$") == 42
    assert parse_integer("12.0") == 12
    assert parse_integer("-3") == -3
    for bad in (None, "", "12.5", "x", "3/4", "1e3"):
        assert parse_integer(bad) is None


def corpus_computations(text):
    """Computation keys of every worked solution in a corpus text (runs of step lines before a box line)."""
    keys, run = [], []
    for line in text.split("\n"):
        line = line.removeprefix("Solution: ")
        if STEP_RE.match(line):
            run.append(line)
        elif line.startswith("The answer is \\boxed{"):
            assert run, "a boxed answer without worked steps"
            for step in run:
                check_step(step)
            keys.append(computation_key(run))
            run = []
        else:
            run = []
    return keys


def test_corpus_shards_have_text_and_no_test_problems(tmp_path):
    out = tmp_path / "corpus"
    paths = write_synthetic_corpus(str(out), num_shards=2, docs_per_shard=150, seed=0)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert sorted(os.listdir(out)) == ["shard_00000.parquet", "shard_00001.parquet"]  # no temp files left
    texts = []
    for path in paths:
        table = pq.read_table(path)
        assert table.column_names == ["text"] and table.num_rows == 150
        assert pq.ParquetFile(path).num_row_groups > 1
        texts += table.column("text").to_pylist()
    corpus = "\n".join(texts)
    assert len(corpus) > 50_000
    assert "Question: " in corpus and "Solution: " in corpus and "The capital of" in corpus
    keys = corpus_computations(corpus)
    assert len(keys) > 300
    assert all(split_of(k) == "train" for k in keys)
    test = SyntheticReasoning("test", 1000, seed=0, difficulty="medium")
    assert not any(test[i]["problem"] in corpus for i in range(len(test)))
    # deterministic, and shard k does not depend on how many shards were asked for
    again = write_synthetic_corpus(str(tmp_path / "again"), num_shards=1, docs_per_shard=150, seed=0)
    assert pq.read_table(again[0]).column("text").to_pylist() == texts[:150]
    other = write_synthetic_corpus(str(tmp_path / "other"), num_shards=1, docs_per_shard=150, seed=1)
    assert pq.read_table(other[0]).column("text").to_pylist() != texts[:150]


def test_cli_writes_shards(tmp_path, monkeypatch, capsys):
    # in-process (the module's __main__ block is just run_main(main)): a subprocess would pay torch's import again
    from reasoning.common import run_main
    from tasks.synthetic import main

    monkeypatch.setattr(sys, "argv", ["synthetic", "--out", str(tmp_path), "--num-shards", "1",
                                      "--docs-per-shard", "5", "--show", "1"])
    run_main(main)
    assert os.listdir(tmp_path) == ["shard_00000.parquet"]
    assert "\\boxed{" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["synthetic", "--out", str(tmp_path), "--num-shards", "0"])
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: --num-shards 0") and len(err.strip().splitlines()) == 1


def test_answer_only_fraction_keeps_problems_and_drops_worked_steps():
    from tasks.synthetic import SyntheticReasoning

    full = SyntheticReasoning(split="train", size=200, seed=3)
    mixed = SyntheticReasoning(split="train", size=200, seed=3, answer_only_frac=0.5)
    bare = SyntheticReasoning(split="train", size=200, seed=3, answer_only_frac=1.0)
    answer_only = 0
    for i in range(200):
        a, b, c = full[i], mixed[i], bare[i]
        assert a["problem"] == b["problem"] == c["problem"] and a["answer"] == b["answer"] == c["answer"]
        assert [p["type"] for p in a["messages"][1]["content"]] == ["think", "text"]
        assert [p["type"] for p in c["messages"][1]["content"]] == ["text"]
        answer_only += [p["type"] for p in b["messages"][1]["content"]] == ["text"]
        assert full.evaluate(a, c["messages"][1]["content"][0]["text"])
    assert 70 <= answer_only <= 130  # ~half, seeded
    with pytest.raises(ValueError, match="answer_only_frac"):
        SyntheticReasoning(answer_only_frac=1.5)
