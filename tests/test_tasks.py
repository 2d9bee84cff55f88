"""Task loaders and the registry: GSM8K tool-call conversion, MATH/MATH-500 and GSM8K local files (the shared data),
customjson formats and its file:line errors, SmolTalk rows, mixture specs (determinism, oversampling), offline
errors that name --data-path."""

import json
import os
from collections import Counter

import pytest

from reasoning.common import UserError
from reasoning.tokenizer import Tokenizer
from tasks.customjson import CustomJSON
from tasks.gsm8k import parse_gsm8k_answer
from tasks.common import final_answer
from tasks.math import grade_math
from tasks.registry import build_mixture, build_task, canonical_name, parse_mixture, task_label
from tasks.smoltalk import SmolTalk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("REASONING_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"shared test data not found at {SHARED} "
                                                                    "(set $REASONING_SHARED_DATA)")


@pytest.fixture(scope="module")
def byte_tokenizer():
    return Tokenizer({bytes([i]): i for i in range(256)})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the hub: the registry then fails fast instead of retrying for ~30 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("REASONING_TASK_DATA_DIR", raising=False)


# ----------------------------------------------------------------------------------------------- GSM8K

def test_gsm8k_annotations_become_tool_calls(byte_tokenizer):
    answer = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72")
    parts, gold = parse_gsm8k_answer(answer)
    assert gold == "72"
    assert parts == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether.\nThe answer is \\boxed{72}."},
    ]
    # the tool's output is not trained on, the call itself is
    ids, mask = byte_tokenizer.render_conversation(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}]})
    out_start = byte_tokenizer.encode_special("<|output_start|>")
    out_end = byte_tokenizer.encode_special("<|output_end|>")
    py_start = byte_tokenizer.encode_special("<|python_start|>")
    inside_output = False
    for token, m in zip(ids, mask):
        inside_output = inside_output or token == out_start
        if inside_output:
            assert m == 0
        if token == out_end:
            inside_output = False
        if token == py_start:
            assert m == 1
    assert byte_tokenizer.decode([t for t, m in zip(ids, mask) if m]).endswith("\\boxed{72}.<|assistant_end|>")


def test_gsm8k_edge_cases():
    parts, gold = parse_gsm8k_answer("It costs <<5>> 5 dollars, 1,000 in total.\n#### 1,000")
    assert gold == "1000"  # thousands separators dropped from the gold
    assert [p["type"] for p in parts] == ["text"]  # an annotation without '=' has no result: dropped
    assert parts[0]["text"].startswith("It costs  5 dollars")
    with pytest.raises(ValueError, match="####"):
        parse_gsm8k_answer("no final line")


@needs_shared
def test_gsm8k_local_files_and_calculator_agreement(byte_tokenizer):
    from reasoning.calculator import calculate

    train = build_task("GSM8K", "train", data_path=SHARED)
    test = build_task("gsm8k", "test", data_path=os.path.join(SHARED, "gsm8k_test.jsonl"))
    assert (len(train), len(test)) == (7473, 1319)
    calls = agree = 0
    for i in range(0, len(train), 7):
        example = train[i]
        byte_tokenizer.render_conversation(example)  # valid conversation structure
        parts = example["messages"][1]["content"]
        assert parts[-1]["text"].endswith(f"\\boxed{{{example['answer']}}}.")
        for call, output in zip(parts, parts[1:]):
            if call["type"] == "python":
                calls += 1
                result = calculate(call["text"])
                agree += result is not None and abs(float(result) - float(output["text"])) < 1e-6 * max(
                    1.0, abs(float(output["text"])))
    # what the engine's tool will answer at inference is what the data shows
    assert calls > 2000 and agree / calls > 0.99
    example = test[0]
    assert test.evaluate(example, f"blah \\boxed{{{example['answer']}}}")
    assert not test.evaluate(example, f"\\boxed{{{int(example['answer']) + 1}}}")


# ----------------------------------------------------------------------------------------------- MATH

@needs_shared
def test_math500_local_file_fields_and_gold_solutions():
    task = build_task("MATH-500", "test", data_path=SHARED)
    assert len(task) == 500 and task.name == "MATH-500"
    examples = list(task)
    assert Counter(e["level"] for e in examples).keys() == {1, 2, 3, 4, 5}
    assert len({e["subject"] for e in examples}) == 7
    assert len({e["id"] for e in examples}) == 500 and all(e["id"].startswith("test/") for e in examples)
    for e in examples:
        assert e["messages"][0]["content"].startswith(e["problem"])
        assert e["messages"][1]["content"][-1]["text"] == f"The answer is \\boxed{{{e['answer']}}}."
    # the reference solution graded as a completion is correct (the full gold sweep is in test_eval.py)
    integers = [e for e in examples if e["answer"].isdigit()]
    first, other = integers[0], next(e for e in integers if e["answer"] != integers[0]["answer"])
    assert task.evaluate(first, first["solution"])
    assert not task.evaluate(first, other["solution"])  # (plain numbers: no sympy worker needed here)


def test_math_rows_without_answer_use_the_last_box(tmp_path):
    rows = [{"problem": "1+1?", "solution": "First \\boxed{3}, no: $\\boxed{2}$.", "level": "Level 2",
             "type": "Algebra"}]
    path = tmp_path / "math_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = build_task("MATH", "train", data_path=str(tmp_path))
    example = task[0]
    assert (example["answer"], example["level"], example["subject"]) == ("2", 2, "Algebra")
    assert example["messages"][1]["content"][0] == {"type": "think", "text": rows[0]["solution"]}


def test_final_answer_respects_the_think_span():
    assert final_answer("<|think_start|>maybe \\boxed{1}<|think_end|>so \\boxed{2}") == "2"
    assert final_answer("<|think_start|>maybe \\boxed{1} and never closed") is None
    assert final_answer("#### 17") == "17"  # non-strict extraction for evaluation
    assert grade_math("\\frac{1}{2}", "The answer is \\boxed{0.5}.")
    assert not grade_math("2", "nothing here")


# ----------------------------------------------------------------------------------------------- customjson

def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_customjson_formats(tmp_path, byte_tokenizer):
    path = write_lines(tmp_path / "mine.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "\\boxed{4}", "thinking": "2+2 is 4"}], "answer": 4},
        "",  # blank lines are allowed
        {"problem": "3*3?", "thinking": "three threes", "answer": "9"},
        {"problem": "half of 1?", "thinking": "", "answer": "So it is \\boxed{\\frac12}."},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]},
    ])
    task = CustomJSON(path)
    assert len(task) == 4
    chat, distill, boxed, plain = (task[i] for i in range(4))
    assert chat["messages"][2]["content"] == [{"type": "think", "text": "2+2 is 4"},
                                              {"type": "text", "text": "\\boxed{4}"}]
    assert chat["answer"] == "4" and chat["id"] == "mine.jsonl:1"
    assert distill["id"] == "mine.jsonl:3"  # ids are file line numbers
    assert distill["messages"] == [{"role": "user", "content": "3*3?"}, {"role": "assistant", "content": [
        {"type": "think", "text": "three threes"}, {"type": "text", "text": "The answer is \\boxed{9}."}]}]
    assert boxed["answer"] == "\\frac12" and boxed["messages"][1]["content"] == [
        {"type": "text", "text": "So it is \\boxed{\\frac12}."}]
    assert plain["answer"] is None and plain["messages"][1]["content"] == "hello"
    for example in task:
        byte_tokenizer.render_conversation(example)
    assert task.evaluate(distill, "<|think_start|>x<|think_end|>\\boxed{9}")
    assert task.evaluate(boxed, "\\boxed{0.5}")
    with pytest.raises(ValueError, match="no 'answer'"):
        task.evaluate(plain, "hello")
    mixture = build_mixture(f"customjson:{path},customjson:{path}", seed=1)
    assert len(mixture) == 8


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"foo": 1}', "expected a 'messages' list or problem/thinking/answer"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "expected 'user'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "thinking": ""}]}',
     "empty"),
    ('{"problem": "x", "thinking": "y"}', "'answer' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '
     '[{"type": "python_output", "text": "1"}]}]}', "must follow a python part"),
])
def test_customjson_bad_line_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"problem": "1+1?", "thinking": "t", "answer": "2"})
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(UserError) as info:
        CustomJSON(str(path))
    assert str(info.value).startswith(f"{path}:4: ") and message in str(info.value)


def test_customjson_missing_file():
    with pytest.raises(UserError, match="does not exist"):
        build_task("customjson:/nonexistent/file.jsonl")


# ----------------------------------------------------------------------------------------------- SmolTalk

def test_smoltalk_local_parquet_and_jsonl(tmp_path, byte_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]
    pq.write_table(pa.table({"messages": [r["messages"] for r in rows]}), tmp_path / "smoltalk_train.parquet")
    write_lines(tmp_path / "smoltalk_test.jsonl", rows[:2])
    train = build_task("smoltalk", "train", data_path=str(tmp_path))
    test = SmolTalk("test", data_path=str(tmp_path / "smoltalk_test.jsonl"))
    assert (len(train), len(test)) == (3, 2)
    assert train[0]["messages"] == rows[0]["messages"] and test[1]["messages"] == rows[1]["messages"]
    byte_tokenizer.render_conversation(train[1])
    with pytest.raises(ValueError, match="row 2: message 1 has role 'user', expected 'assistant'"):
        train[2]


# ----------------------------------------------------------------------------------------------- registry

def test_offline_without_data_names_the_flag(monkeypatch, tmp_path):
    for name in ("GSM8K", "MATH", "MATH-500", "SmolTalk"):
        with pytest.raises(UserError) as info:
            build_task(name, "test" if name == "MATH-500" else "train")
        text = str(info.value)
        assert "--data-path" in text and name in text and "\n" not in text
    with pytest.raises(UserError, match="--data-path .*no such file"):
        build_task("GSM8K", data_path=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="has none of the GSM8K files"):
        build_task("GSM8K", data_path=str(tmp_path))


def test_math500_is_a_test_set_only(tmp_path):
    with pytest.raises(ValueError, match="MATH-500 has only a test split"):
        build_task("MATH-500", "train", data_path=str(tmp_path))


def test_data_dir_env_is_searched(monkeypatch, tmp_path):
    write_lines(tmp_path / "gsm8k_test.jsonl", [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])
    monkeypatch.setenv("REASONING_TASK_DATA_DIR", str(tmp_path))
    task = build_task("GSM8K", "test")
    assert len(task) == 1 and task[0]["answer"] == "2"


def test_the_corpus_folder_is_not_a_task_folder(monkeypatch, tmp_path):
    """$REASONING_DATA_DIR names the pretraining shards only: task files are never looked up there."""
    write_lines(tmp_path / "gsm8k_test.jsonl", [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}])
    monkeypatch.setenv("REASONING_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="hub is unreachable"):
        build_task("GSM8K", "test")


def test_unknown_synthetic_difficulty_is_one_line():
    with pytest.raises(UserError, match=r"^synthetic difficulty 'impossible': expected one of easy, ") as err:
        build_task("synthetic", "test", size=2, difficulty="impossible")
    assert "\n" not in str(err.value)


def test_names_and_specs():
    assert canonical_name("gsm8k") == "GSM8K" and canonical_name("math500") == "MATH-500"
    assert canonical_name("customjson:a/b.jsonl") == "customjson:a/b.jsonl"
    assert task_label("customjson:a/b.jsonl") == "customjson_b" and task_label("MATH-500") == "MATH-500"
    assert parse_mixture("GSM8K*2, MATH@/d ,SmolTalk") == [("GSM8K", 2, None), ("MATH", 1, "/d"),
                                                          ("SmolTalk", 1, None)]
    for bad in ("nope", "customjson", "GSM8K:x", "", " , "):
        with pytest.raises(UserError):
            parse_mixture(bad)


def test_mixture_determinism_and_oversampling(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"problem": f"p{i}", "thinking": "t", "answer": str(i)}
                                               for i in range(5)])
    spec = f"synthetic*3,customjson:{path}"

    def listing(seed):
        mixture = build_mixture(spec, seed=seed, size=20)
        return [(e["task"], e["problem"]) for e in mixture]

    first = listing(seed=7)
    assert first == listing(seed=7)  # same seed, same order
    other = listing(seed=8)  # (the seed also picks the synthetic problems)
    assert first != other
    assert [p for t, p in first if t == "customjson"] != [p for t, p in other if t == "customjson"]
    for run in (first, other):
        assert Counter(task for task, _ in run) == {"SyntheticReasoning": 3 * 20, "customjson": 5}
    per_problem = Counter(problem for task, problem in first if task == "SyntheticReasoning")
    assert len(per_problem) == 20 and set(per_problem.values()) == {3}  # each synthetic example exactly 3 times
    # shuffled: the three copies are not laid out back to back
    assert [task for task, _ in first[:60]] != ["SyntheticReasoning"] * 60
