"""Generative evaluation: the grader accepts MATH-500's own solutions and rejects shuffled ones, pass@k equals the
combinatorial formula, maj@k groups equivalent answers, a killed evaluation resumes to the same predictions, and
chat_eval on 2 torchrun ranks (gloo) matches 1 rank."""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest

from helpers_models import save_tiny_checkpoint, train_small_tokenizer
from reasoning.checkpoint import load_model
from reasoning.evaluation import (BASE_TEMPLATE, TEMPLATE_SLOT, EvalSettings, answer_classes, build_prompt,
                                  evaluate_task, grade_completion, majority_index, pass_at_k, section_name,
                                  standard_error, summarize, template_text)
from tasks.registry import build_task
from tasks.synthetic import SyntheticReasoning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("REASONING_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"shared test data not found at {SHARED} "
                                                                    "(set $REASONING_SHARED_DATA)")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A base dir holding a tokenizer and a random tiny 'sft' checkpoint."""
    base = tmp_path_factory.mktemp("evalrun")
    tokenizer_dir = str(base / "tokenizer")
    train_small_tokenizer(tokenizer_dir)
    save_tiny_checkpoint(str(base), tokenizer_dir, stage="sft", tag="tiny", max_seq_len=256)
    return base


@pytest.fixture(scope="module")
def model_and_tokenizer(run_dir):
    model, tokenizer, _ = load_model("sft", tag="tiny", base_dir=str(run_dir))
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- grading

@needs_shared
def test_math500_gold_solutions_grade_correct_and_shuffled_ones_do_not():
    task = build_task("MATH-500", "test", data_path=SHARED)
    examples = list(task)
    gold = [dict(index=i, sample=0, num_tokens=0, stop_reason="stop", level=e["level"], subject=e["subject"],
                 **grade_completion(task, e, e["solution"])) for i, e in enumerate(examples)]
    summary = summarize(gold, 1)
    assert summary["accuracy"] >= 0.995 and summary["no_answer_frac"] == 0
    assert [row["level"] for row in summary["by_level"]] == [1, 2, 3, 4, 5]
    assert sum(row["n"] for row in summary["by_subject"]) == 500
    # every 4th problem against the next problem's solution (each pair may need a sympy worker round trip)
    shuffled = [grade_completion(task, examples[i], examples[(i + 1) % 500]["solution"])["correct"]
                for i in range(0, 500, 4)]
    assert sum(shuffled) / len(shuffled) < 0.05


def test_pass_at_k_matches_the_combinatorial_formula():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # fewer wrong samples than k: always a hit
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    # large n: no overflow, still the exact value
    exact = 1 - Fraction(math.comb(997, 100), math.comb(1000, 100))
    assert pass_at_k(1000, 3, 100) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_groups_equivalent_answers():
    answers = ["3", "1/2", "0.5", None, "\\frac12", "3", "x"]
    classes = answer_classes(answers)
    assert classes[1] == classes[2] == classes[4] != classes[0] == classes[5] and classes[3] is None
    assert majority_index(answers) == 1  # {1/2, 0.5, \frac12} x3 beats {3} x2
    assert majority_index(["7", "8", "8", "7"]) == 0  # a tie goes to the class seen first
    assert majority_index([None, None]) is None

    def rec(index, sample, extracted, correct):
        return dict(index=index, sample=sample, extracted=extracted, correct=correct, num_tokens=4,
                    stop_reason="stop", level=None, subject=None)

    records = [rec(0, 0, "0.5", True), rec(0, 1, "2", False), rec(0, 2, "\\frac{1}{2}", True), rec(0, 3, "2", False),
               rec(1, 0, "1", False), rec(1, 1, "1", False), rec(1, 2, "4", True), rec(1, 3, None, False)]
    summary = summarize(records, 4)
    assert summary["maj@4"] == 0.5  # problem 0: 1/2 wins the tie by first occurrence; problem 1: "1" wins
    assert summary["pass@1"] == summary["accuracy"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert summary["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert summary["pass@4"] == 1.0 and summary["no_answer_frac"] == 1 / 8
    # the standard error is over problems (scores 2/4 and 1/4), not over the 8 completions
    assert summary["accuracy_se"] == pytest.approx(math.sqrt(((0.5 - 0.375) ** 2 + (0.25 - 0.375) ** 2) / 1 / 2))


def test_standard_error_of_a_greedy_accuracy_is_the_binomial_one():
    scores = [1.0] * 300 + [0.0] * 700
    assert standard_error(scores) == pytest.approx(math.sqrt(0.3 * 0.7 / 999))
    assert standard_error([1.0, 1.0, 1.0]) == 0.0 and standard_error([1.0]) is None and standard_error([]) is None
    records = [dict(index=i, sample=0, extracted="1", correct=i < 3, num_tokens=1, stop_reason="stop")
               for i in range(10)]
    assert summarize(records, 1)["accuracy_se"] == pytest.approx(standard_error([1.0] * 3 + [0.0] * 7))


def test_section_names():
    assert section_name("synthetic", "sft") == "chat_eval_sft"
    assert section_name("MATH-500", "rl") == "math500_rl"
    assert section_name("gsm8k", "base") == "gsm8k_base"
    assert section_name("MATH-500", "rl", num_samples=8) == "math500_rl_k8"


# ----------------------------------------------------------------------------------------------- resume

def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def test_resume_after_a_kill_gives_the_same_predictions(model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    task = SyntheticReasoning("test", size=20, seed=0)
    settings = EvalSettings(num_samples=3, temperature=1.0, max_tokens=12, batch_size=2, seed=5)

    def run(out_dir, **kw):
        return evaluate_task(model, tokenizer, task, settings, max_problems=7, out_dir=str(out_dir), **kw)

    full = run(tmp_path / "full")
    reference = read_lines(tmp_path / "full" / "predictions.jsonl")
    assert len(reference) == 7 * 3 and full["num_problems"] == 7
    assert len({(json.loads(r)["index"], json.loads(r)["sample"]) for r in reference}) == 21

    # killed after 2 rounds (4 problems written), then rerun
    assert run(tmp_path / "killed", stop_after_rounds=2) is None
    assert len(read_lines(tmp_path / "killed" / "predictions.jsonl")) == 4 * 3
    resumed = run(tmp_path / "killed")
    assert read_lines(tmp_path / "killed" / "predictions.jsonl") == reference
    assert {k: resumed[k] for k in ("accuracy", "pass@3", "maj@3")} == {k: full[k] for k in ("accuracy", "pass@3",
                                                                                          "maj@3")}

    # killed mid-write: a torn last line and a problem with only some of its samples
    path = tmp_path / "torn" / "predictions.jsonl"
    run(tmp_path / "torn")
    text = path.read_text()
    path.write_text(text[:len(text) - len(reference[-1]) // 2 - 40])
    run(tmp_path / "torn")
    assert read_lines(path) == reference

    # nothing left to do: no generation at all, the summary is recomputed from the file
    from reasoning import engine

    def must_not_generate(*args, **kwargs):
        raise AssertionError("a finished evaluation must not generate again")

    monkeypatch.setattr(engine.Engine, "generate", must_not_generate)
    again = run(tmp_path / "full")
    assert again["accuracy"] == full["accuracy"] and again["tokens_per_s"] is None
    assert read_lines(tmp_path / "full" / "predictions.jsonl") == reference


def test_bad_sampling_settings_fail_before_touching_earlier_results(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    task = SyntheticReasoning("test", size=5, seed=0)
    evaluate_task(model, tokenizer, task, EvalSettings(max_tokens=4), out_dir=str(tmp_path))
    before = {name: (tmp_path / name).read_text() for name in ("predictions.jsonl", "protocol.json")}
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(temperature=float("nan"))):
        with pytest.raises(ValueError, match="temperature|top_k"):
            evaluate_task(model, tokenizer, task, EvalSettings(max_tokens=4, **bad), out_dir=str(tmp_path))
    assert {name: (tmp_path / name).read_text() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl", "protocol.json", "summary.json"]


def test_sampled_predictions_do_not_depend_on_batch_size(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    task = SyntheticReasoning("test", size=10, seed=0)
    outputs = {}
    for batch_size in (1, 3, 7):
        settings = EvalSettings(num_samples=3, temperature=1.0, max_tokens=10, batch_size=batch_size, seed=11)
        evaluate_task(model, tokenizer, task, settings, max_problems=7, out_dir=str(tmp_path / str(batch_size)))
        outputs[batch_size] = [json.loads(r) for r in read_lines(tmp_path / str(batch_size) / "predictions.jsonl")]
    assert outputs[1] == outputs[3] == outputs[7]
    # ...while the samples of one problem are different draws (the seeds really are per sample and per problem)
    completions = [r["completion"] for r in outputs[1]]
    assert len(set(completions)) > len(completions) // 2


def test_majority_is_graded_where_the_samples_are_made(model_and_tokenizer, tmp_path, monkeypatch):
    """maj@k's answer-equivalence checks run in generate_records, on every rank for its own problems; rank 0's
    summarize only counts the verdicts (older prediction files without them are still graded there)."""
    import reasoning.evaluation as evaluation

    model, tokenizer = model_and_tokenizer
    task = SyntheticReasoning("test", size=6, seed=0)
    settings = EvalSettings(num_samples=3, temperature=1.0, max_tokens=10, batch_size=3, seed=5)
    evaluate_task(model, tokenizer, task, settings, max_problems=6, out_dir=str(tmp_path))
    records = [json.loads(r) for r in read_lines(tmp_path / "predictions.jsonl")]
    by_problem = {}
    for r in records:
        by_problem.setdefault(r["index"], []).append(r)
    for samples in by_problem.values():
        assert {s["majority_correct"] for s in samples} == {evaluation.majority_correct(samples)}
    expected = summarize([{k: v for k, v in r.items() if k != "majority_correct"} for r in records], 3)["maj@3"]
    monkeypatch.setattr(evaluation, "majority_index", lambda answers: pytest.fail("graded again on rank 0"))
    assert summarize(records, 3)["maj@3"] == expected


def _hf_qwen_tokenizer(tmp_path):
    from reasoning.hf_tokenizer import HFTokenizer
    from test_hf import write_tokenizer

    write_tokenizer(str(tmp_path), "qwen")
    return HFTokenizer.load(str(tmp_path))


@pytest.mark.parametrize("which", ["ours", "qwen"])
@pytest.mark.parametrize("mode", ["chat", "base"])
def test_recorded_template_is_the_prompt_actually_sent(model_and_tokenizer, tmp_path, which, mode):
    tokenizer = model_and_tokenizer[1] if which == "ours" else _hf_qwen_tokenizer(tmp_path)
    example = SyntheticReasoning("test", size=1, seed=3)[0]
    template = template_text(mode, tokenizer)
    filled = template.replace(TEMPLATE_SLOT[mode], example["messages"][0]["content"] if mode == "chat"
                              else example["problem"], 1)
    assert filled.startswith(tokenizer.decode(build_prompt(tokenizer, example, mode)) + "   (")
    if which == "qwen" and mode == "chat":
        assert template.startswith("<|im_start|>user\n{user message}<|im_end|>\n<|im_start|>assistant\n")


def test_changed_settings_start_over(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    task = SyntheticReasoning("test", size=5, seed=0)
    evaluate_task(model, tokenizer, task, EvalSettings(max_tokens=4), out_dir=str(tmp_path))
    first = read_lines(tmp_path / "predictions.jsonl")
    summary = evaluate_task(model, tokenizer, task, EvalSettings(max_tokens=6, prompt_mode="base"),
                            out_dir=str(tmp_path))
    second = [json.loads(line) for line in read_lines(tmp_path / "predictions.jsonl")]
    assert len(second) == 5 and [json.dumps(r) for r in second] != first
    assert read_lines(tmp_path / "predictions.old1.jsonl") == first  # the earlier run is kept, not overwritten
    assert json.load(open(tmp_path / "protocol.old1.json"))["max_tokens"] == 4
    assert all(r["prompt"].startswith("<|bos|>Problem: ") and r["prompt"].endswith("\nSolution:") for r in second)
    assert summary["protocol"]["template"].startswith("<|bos|>" + BASE_TEMPLATE)


# ----------------------------------------------------------------------------------------------- chat_eval

@pytest.mark.slow
def test_chat_eval_two_ranks_match_one_rank(run_dir, tmp_path, monkeypatch, capsys):
    from scripts import chat_eval

    # sampled, so the comparison also shows that samples do not depend on sharding or batching
    common = ["-a", "synthetic", "--max-problems", "9", "--batch-size", "2", "--max-tokens", "10",
              "--num-samples", "2", "--temperature", "1.0", "--base-dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", REASONING_BASE_DIR=str(run_dir), PYTHONPATH=REPO)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "scripts.chat_eval", "--", *common, "--out-dir", str(tmp_path / "two"),
                          "--no-report"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    last = two.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT task=synthetic accuracy=") and "pass@k=" in last and "maj@k=" in last

    chat_eval.main(common + ["--out-dir", str(tmp_path / "one")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == last

    two_lines = read_lines(tmp_path / "two" / "predictions.jsonl")
    one_lines = read_lines(tmp_path / "one" / "predictions.jsonl")
    assert len(two_lines) == 18 and len({json.loads(r)["index"] for r in two_lines}) == 9
    assert two_lines == one_lines
    summaries = [json.load(open(tmp_path / name / "summary.json")) for name in ("one", "two")]
    assert summaries[1]["world_size"] == 2
    for key in ("accuracy", "pass@2", "maj@2", "no_answer_frac", "mean_completion_tokens", "protocol"):
        assert summaries[0][key] == summaries[1][key]
    section = json.load(open(run_dir / "report" / "chat_eval_sft_k2.json"))
    assert section["metrics"]["accuracy"] == summaries[0]["accuracy"]


@needs_shared
def test_chat_eval_math500_writes_levels_and_protocol(run_dir, tmp_path, capsys):
    from scripts import chat_eval

    out = tmp_path / "m500"
    # the fixture model's 256-token context is shorter than some MATH-500 prompts: those are recorded, not fatal
    chat_eval.main(["-a", "MATH-500", "--data-path", SHARED, "--max-problems", "6", "--max-tokens", "4",
                    "--base-dir", str(run_dir), "--out-dir", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "RESULT task=MATH-500 accuracy=0.0000 pass@k=0.0000 maj@k=0.0000 k=1"
    records = [json.loads(line) for line in read_lines(out / "predictions.jsonl")]
    assert [r["index"] for r in records] == list(range(6))
    assert all(r["level"] in range(1, 6) and r["subject"] and r["gold"] for r in records)
    assert any(r["stop_reason"] == "prompt_too_long" for r in records)
    summary = json.load(open(out / "summary.json"))
    assert summary["protocol"]["grader"].startswith("reasoning.verifiers.math_equal")
    assert summary["protocol"]["checkpoint"]["dir"].endswith(os.path.join("sft", "tiny"))
    section = json.load(open(run_dir / "report" / "math500_sft.json"))
    assert sum(row["n"] for row in section["tables"]["accuracy by level"]) == 6
    assert list(section["metrics"])[:4] == ["accuracy", "accuracy_se", "pass@1", "maj@1"]
    assert section["metrics"]["accuracy_se"] == 0.0  # six wrong answers: no spread
