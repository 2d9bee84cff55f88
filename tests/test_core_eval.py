"""CORE-style evaluation: continuation scoring against an unbatched float64 reference, rendering, aggregation."""

import pytest
import torch

from reasoning.common import UserError
from reasoning.core_eval import evaluate_core, is_correct, load_bundle, render_example, score_continuations
from reasoning.gpt import GPT, config_from_depth
from reasoning.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_corpus):
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(config_from_depth(1, tokenizer.vocab_size, max_seq_len=64, aspect_ratio=32))
    model.init_weights()
    with torch.no_grad():  # an untrained model predicts ~uniformly; random weights give distinct scores
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval(), tokenizer


def reference_score(model, tokenizer, context, continuation):
    """One sequence, no padding, log-softmax in float64."""
    cont = tokenizer.encode(continuation)
    ids = tokenizer.encode(context, prepend=tokenizer.bos_token_id) + cont
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].double()  # (T, V)
    logprobs = torch.log_softmax(logits, -1)
    positions = range(len(ids) - 1 - len(cont), len(ids) - 1)
    loss = -sum(logprobs[t, ids[t + 1]].item() for t in positions) / len(cont)
    hit = all(logits[t].argmax().item() == ids[t + 1] for t in positions)
    return loss, hit


def test_batched_scores_match_unbatched_reference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    pairs = [("The capital of France is", " Paris"), ("A spider has", " eight legs and two eyes"),
             ("After Monday comes", " Tuesday."), ("Question: What is 7 + 5?\nSolution:", " 12")]
    scores = score_continuations(model, tokenizer, pairs, "cpu")
    for (context, continuation), (loss, hit) in zip(pairs, scores):
        ref_loss, ref_hit = reference_score(model, tokenizer, context, continuation)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert hit == ref_hit
    assert len({round(s[0], 4) for s in scores}) == len(pairs)  # distinct: padding did not blur rows together


def test_long_context_is_cropped_from_the_left(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long_context = "The color of snow is white. " * 40  # far beyond the 64-token context
    (loss, _), = score_continuations(model, tokenizer, [(long_context, " white")], "cpu")
    assert loss > 0 and loss == loss  # finite, no positional overflow


def test_render_and_correctness():
    mc = {"query": "Q: 2+2?", "choices": ["3", "4"], "gold": 1}
    shot = {"query": "Q: 1+1?", "choices": ["2", "5"], "gold": 0}
    assert render_example("multiple_choice", mc, [shot], "\nA: ") == [
        ("Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: ", "3"), ("Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: ", "4")]
    schema = {"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1}
    assert render_example("schema", schema, [], " ") == [("The cat ", "barked."), ("The dog ", "barked.")]
    lm = {"context": "One plus one is", "continuation": "two"}
    assert render_example("language_modeling", lm, [lm], " ") == [("One plus one is two\n\nOne plus one is ", "two")]
    assert is_correct("multiple_choice", mc, [(2.0, False), (1.0, False)])
    assert not is_correct("schema", schema, [(0.5, True), (1.0, True)])
    assert is_correct("language_modeling", lm, [(9.0, True)])
    assert not is_correct("language_modeling", lm, [(0.1, False)])


def test_evaluate_core_aggregates_per_task(model_and_tokenizer, core_bundle):
    model, tokenizer = model_and_tokenizer
    bundle, tasks = core_bundle
    specs = load_bundle(bundle)
    assert [(s["label"], s["num_fewshot"], s["delimiter"]) for s in specs] == [("count", 2, " "), ("legs", 0, " "),
                                                                                 ("days", 1, "")]
    result = evaluate_core(model, tokenizer, bundle, max_per_task=5)
    rows = {r["task"]: r for r in result["tasks"]}
    assert all(r["examples"] == 5 for r in rows.values())
    # the schema task has no few-shot examples, so its accuracy can be recomputed pair by pair
    expected = 0
    for example in tasks["schema.jsonl"][:5]:
        losses = [reference_score(model, tokenizer, c, k)[0] for c, k in render_example("schema", example, [], " ")]
        expected += losses.index(min(losses)) == example["gold"]
    assert rows["legs"]["accuracy"] == pytest.approx(expected / 5)
    for label, baseline in (("count", 0.3333), ("legs", 0.5), ("days", 0.0)):
        r = rows[label]
        assert r["centered"] == pytest.approx((r["accuracy"] - baseline) / (1 - baseline))
    assert result["core"] == pytest.approx(sum(r["centered"] for r in rows.values()) / 3)
    assert evaluate_core(model, tokenizer, bundle, max_per_task=5) == result  # seeded few-shot picks


def test_bad_bundle_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="core.yaml"):
        load_bundle(str(tmp_path))
