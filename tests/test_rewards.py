"""Tests for reasoning/rewards.py: the think span in both chat formats, correctness / format / overlong rewards
and their combination."""

import pytest

from reasoning.hf_tokenizer import CHAT_FORMATS
from reasoning.rewards import (THINK_MARKERS, Completion, answer_text, combine_rewards, correctness_reward,
                               format_reward, overlong_penalty)

# A native completion rewritten the way a Qwen3-style chat format decodes it (reasoning.hf_tokenizer's layout).
QWEN_THINK = {"<|think_start|>": "<think>\n", "<|think_end|>": "\n</think>\n\n"}


def _as_qwen(completion: Completion) -> Completion:
    text = completion.text
    for ours, theirs in QWEN_THINK.items():
        text = text.replace(ours, theirs)
    return Completion(text, completion.think_closed, completion.num_tokens, completion.truncated)


def _gold(example):
    return example["answer"]


# ------------------------------------------------------------------------------------------ think span

def test_every_chat_format_has_its_think_markers_listed():
    """A chat format whose think tags the rewards do not know would grade its thinking as the answer."""
    for chat_format in CHAT_FORMATS:
        start, end = (tag.strip() for tag in chat_format.think)
        assert (start, end) in THINK_MARKERS, chat_format.name


@pytest.mark.parametrize("completion, expected", [
    (Completion("<think>\nmaybe \\boxed{4}\n</think>\n\nSo \\boxed{5}."), "\n\nSo \\boxed{5}."),
    (Completion("<think>\nstill thinking \\boxed{5}"), None),                       # never closed
    (Completion("the prompt opened the span</think>\n\n\\boxed{5}"), "\n\n\\boxed{5}"),
    (Completion("thinking, cut off", think_closed=False), None),                    # ... and was truncated
    (Completion("<|think_start|>a<|think_end|>b</think>c"), "c"),                   # the last end marker wins
    (Completion("<think>a</think>b<|think_end|>c"), "c"),
    (Completion("<|think_start|>a</think>b"), "b"),
    (Completion("no span at all \\boxed{5}"), "no span at all \\boxed{5}"),
    (Completion("<thinking>a</thinking> \\boxed{5}"), "<thinking>a</thinking> \\boxed{5}"),  # not a listed tag
])
def test_answer_text(completion, expected):
    assert answer_text(completion) == expected


# ---------------------------------------------------------------------------------------------- rewards

CORRECTNESS_CASES = [
    (Completion("<|think_start|>try \\boxed{4}<|think_end|>So it is \\boxed{5}."), 1.0),  # right, after thinking
    (Completion("<|think_start|>it is \\boxed{5}<|think_end|>I give up."), 0.0),          # box only inside thinking
    (Completion("<|think_start|>it is \\boxed{5} and I keep thinking"), 0.0),             # think never closed
    (Completion("<|think_start|>hmm<|think_end|>\\boxed{6}"), 0.0),                      # wrong
    (Completion("The answer is 5."), 0.0),                                                # no box: strict
    (Completion("\\boxed{\\frac{10}{2}}", think_closed=True), 1.0),                       # markers stripped
    (Completion("\\boxed{5}", think_closed=False), 0.0),
]

FORMAT_CASES = [
    (Completion("<|think_start|>a<|think_end|>so \\boxed{5}"), 1.0),
    (Completion("<|think_start|>a \\boxed{4}<|think_end|>so \\boxed{5}"), 1.0),  # boxes while thinking are fine
    (Completion("<|think_start|>a<|think_end|>\\boxed{5} or \\boxed{6}"), 0.0),   # exactly one box
    (Completion("<|think_start|>a<|think_end|>no box"), 0.0),
    (Completion("<|think_start|>a<|think_end|>\\boxed{5"), 0.0),                  # unclosed box
    (Completion("<|think_start|>a<|think_end|>\\boxed{}"), 0.0),                  # empty box
    (Completion("<|think_start|>a \\boxed{5}"), 0.0),                             # think never closed
    (Completion("\\boxed{5}", think_closed=True), 1.0),
    (Completion("\\boxed{5}", think_closed=False), 0.0),
    (Completion("\\boxed{5}"), 0.0),                                              # no think span at all
]


def test_correctness_reward():
    reward = correctness_reward(_gold)
    assert reward.name == "correctness"
    completions = [c for c, _ in CORRECTNESS_CASES] + ["plain string \\boxed{5}"]
    examples = [{"answer": "5"}] * len(completions)
    assert reward(completions, examples) == [want for _, want in CORRECTNESS_CASES] + [1.0]
    assert reward.score("\\boxed{x=5}", {"answer": "5"}) == 1.0


def test_format_reward():
    reward = format_reward()
    assert reward.name == "format"
    assert reward([c for c, _ in FORMAT_CASES], [None] * len(FORMAT_CASES)) == [want for _, want in FORMAT_CASES]
    assert format_reward(require_think=False).score(Completion("\\boxed{5}")) == 1.0


@pytest.mark.parametrize("make_reward, cases", [(lambda: correctness_reward(_gold), CORRECTNESS_CASES),
                                                (format_reward, FORMAT_CASES)], ids=["correctness", "format"])
def test_rewards_agree_across_chat_formats(make_reward, cases):
    """The same completion decoded in Qwen3's `<think>` layout earns exactly what it earns in ours."""
    reward = make_reward()
    qwen = [_as_qwen(c) for c, _ in cases]
    assert any("</think>" in c.text for c in qwen)
    assert reward(qwen, [{"answer": "5"}] * len(qwen)) == [want for _, want in cases]


def _dapo_reference(num_tokens, max_tokens, buffer):
    """Piecewise definition from the DAPO paper, written independently of the implementation."""
    if num_tokens <= max_tokens - buffer:
        return 0.0
    if num_tokens <= max_tokens:
        return ((max_tokens - buffer) - num_tokens) / buffer
    return -1.0


def test_overlong_penalty_matches_dapo():
    reward = overlong_penalty(max_tokens=100, buffer=20)
    assert reward.name == "overlong"
    lengths = [0, 50, 80, 81, 90, 99, 100, 101, 500]
    values = reward([Completion("x", num_tokens=n) for n in lengths], [None] * len(lengths))
    assert values == pytest.approx([_dapo_reference(n, 100, 20) for n in lengths])
    assert values[4] == pytest.approx(-0.5)
    assert reward.score(Completion("x", num_tokens=10, truncated=True)) == -1.0
    with pytest.raises(ValueError, match="num_tokens"):
        reward.score(Completion("x"))
    for bad in [dict(max_tokens=100, buffer=0), dict(max_tokens=10, buffer=20), dict(max_tokens=100.0, buffer=5)]:
        with pytest.raises(ValueError, match="overlong_penalty"):
            overlong_penalty(**bad)


def test_combine_rewards_keeps_parts():
    combined = combine_rewards([correctness_reward(_gold), format_reward(), overlong_penalty(100, 20)],
                               weights=[1.0, 0.5, 1.0])
    completions = [Completion("<|think_start|>a<|think_end|>\\boxed{5}", num_tokens=90),
                   Completion("<|think_start|>a<|think_end|>\\boxed{6} \\boxed{7}", num_tokens=10)]
    out = combined(completions, [{"answer": "5"}, {"answer": "7"}])
    assert out.parts == {"correctness": [1.0, 1.0], "format": [1.0, 0.0], "overlong": [-0.5, 0.0]}
    assert out.total == pytest.approx([1.0 + 0.5 - 0.5, 1.0])


def test_combine_rewards_validates():
    with pytest.raises(ValueError, match="unique"):
        combine_rewards([format_reward(), format_reward()])
    with pytest.raises(ValueError, match="weights"):
        combine_rewards([format_reward()], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="RewardFn"):
        combine_rewards([lambda c, e: [1.0]])
    with pytest.raises(ValueError, match="completions"):
        format_reward()([Completion("a")], [])

