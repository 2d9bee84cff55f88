"""Reward functions for RL with verifiable rewards: correctness, format, DAPO's overlong penalty, and their sum.

Why this file exists apart from reasoning/verifiers.py: the verifier decides "is this answer right?"; a reward
also decides which part of a completion is the answer (the text after the think span), what shape earns format
credit, and how length is punished. Rewards are named, batch-first callables (`RewardFn`) composed by
`combine_rewards`, which keeps each part's value so the RL loop can log them separately. Reference: DAPO
(Yu et al. 2025) for the overlong soft penalty.

The think span is recognised in every chat format whose decoded text reaches a reward (THINK_MARKERS): our
tokenizer's `<|think_start|>`/`<|think_end|>` and the `<think>`/`</think>` tags of Qwen3-style Hugging Face
chat formats (reasoning.hf_tokenizer maps one onto the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from reasoning.verifiers import extract_answer, math_equal_batch, scan_boxes

# (start, end) of a think span, one pair per chat format. A small explicit list, not a pattern: anything else
# that looks like a tag is ordinary text.
THINK_MARKERS = (("<|think_start|>", "<|think_end|>"), ("<think>", "</think>"))
THINK_START, THINK_END = THINK_MARKERS[0]  # our own tokenizer's markers


@dataclass(frozen=True)
class Completion:
    """One sampled completion as the reward functions see it.

    `text` is the decoded completion. If it still holds the think markers of its chat format (THINK_MARKERS),
    the think span is found from them. Otherwise say so with `think_closed`: True means `text` is only the
    visible answer (what follows the think span), False that thinking never ended. The latter is also needed
    when the prompt itself opened the think span, so a completion cut off while thinking holds no marker.
    """
    text: str
    think_closed: bool | None = None
    num_tokens: int | None = None
    truncated: bool = False  # generation stopped at the token limit (stop_reason "length"/"context")


def _after_think(text: str) -> str | None:
    """The text after the last think-end marker of any format, or None when no think span was closed."""
    position, marker = max((text.rfind(end), end) for _, end in THINK_MARKERS)
    return None if position < 0 else text[position + len(marker):]


def answer_text(completion: Completion) -> str | None:
    """The part of a completion after its think span; None while thinking never ended (nothing to grade)."""
    text = completion.text
    after = _after_think(text)
    if after is not None:
        return after
    if completion.think_closed is False or any(start in text for start, _ in THINK_MARKERS):
        return None
    return text


def _think_closed(completion: Completion) -> bool:
    if completion.think_closed is not None:
        return completion.think_closed
    return _after_think(completion.text) is not None


def _as_completion(item) -> Completion:
    if isinstance(item, Completion):
        return item
    if isinstance(item, str):
        return Completion(text=item)
    raise ValueError(f"completion {item!r:.60}: expected a Completion or a str")


@dataclass(frozen=True)
class RewardFn:
    """A named reward: `fn(completions, examples) -> list[float]`, one value per completion (batch-first, so
    correctness can grade a whole rollout batch in parallel)."""
    name: str
    fn: Callable[[list[Completion], list], list[float]]

    def __call__(self, completions: Sequence, examples: Sequence) -> list[float]:
        completions = [_as_completion(c) for c in completions]
        if len(completions) != len(examples):
            raise ValueError(f"{self.name}: {len(completions)} completions but {len(examples)} examples")
        return [float(v) for v in self.fn(completions, list(examples))]

    def score(self, completion, example=None) -> float:
        return self([completion], [example])[0]


def correctness_reward(gold_fn: Callable[[dict], str], timeout: float | None = None) -> RewardFn:
    """1.0 when the last box of the answer part equals gold_fn(example) under math_equal, else 0.0."""
    def fn(completions, examples):
        answers = [extract_answer(a, strict=True) if (a := answer_text(c)) is not None else None
                   for c in completions]
        graded = [i for i, answer in enumerate(answers) if answer is not None]
        verdicts = math_equal_batch([(str(gold_fn(examples[i])), answers[i]) for i in graded], timeout)
        rewards = [0.0] * len(completions)
        for i, ok in zip(graded, verdicts):
            rewards[i] = float(ok)
        return rewards
    return RewardFn("correctness", fn)


def format_reward(require_think: bool = True) -> RewardFn:
    """1.0 when the think span was closed (if required) and the answer part holds exactly one closed box."""
    def one(completion: Completion) -> float:
        answer = answer_text(completion)
        if answer is None:
            return 0.0
        if require_think and not _think_closed(completion):
            return 0.0
        boxes = scan_boxes(answer)
        return float(len(boxes) == 1 and boxes[0] is not None and boxes[0].strip() != "")
    return RewardFn("format", lambda completions, examples: [one(c) for c in completions])


def overlong_penalty(max_tokens: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong penalty: 0 up to max_tokens - buffer, then linear down to -1 at max_tokens;
    a truncated completion gets -1 whatever its length."""
    if not (isinstance(max_tokens, int) and isinstance(buffer, int) and 0 < buffer <= max_tokens):
        raise ValueError(f"overlong_penalty(max_tokens={max_tokens!r}, buffer={buffer!r}): "
                         f"expected integers with 0 < buffer <= max_tokens")

    def one(completion: Completion) -> float:
        if completion.truncated:
            return -1.0
        if completion.num_tokens is None:
            raise ValueError("overlong_penalty: Completion.num_tokens is required")
        over = completion.num_tokens - (max_tokens - buffer)
        return -min(1.0, max(0, over) / buffer)
    return RewardFn("overlong", lambda completions, examples: [one(c) for c in completions])


@dataclass(frozen=True)
class RewardBreakdown:
    total: list[float]              # weighted sum, one per completion
    parts: dict[str, list[float]]   # each reward's unweighted values, keyed by its name


@dataclass(frozen=True)
class CombinedReward:
    reward_fns: tuple[RewardFn, ...]
    weights: tuple[float, ...]

    def __call__(self, completions: Sequence, examples: Sequence) -> RewardBreakdown:
        parts = {r.name: r(completions, examples) for r in self.reward_fns}
        total = [sum(w * parts[r.name][i] for r, w in zip(self.reward_fns, self.weights))
                 for i in range(len(completions))]
        return RewardBreakdown(total=total, parts=parts)


def combine_rewards(reward_fns: Sequence[RewardFn], weights: Sequence[float] | None = None) -> CombinedReward:
    """Weighted sum of named rewards that keeps every part for logging."""
    reward_fns = tuple(reward_fns)
    if not reward_fns or not all(isinstance(r, RewardFn) for r in reward_fns):
        raise ValueError(f"combine_rewards: expected a non-empty list of RewardFn, got {reward_fns!r:.100}")
    names = [r.name for r in reward_fns]
    if len(set(names)) != len(names):
        raise ValueError(f"combine_rewards: reward names must be unique, got {names}")
    weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * len(reward_fns)))
    if len(weights) != len(reward_fns):
        raise ValueError(f"combine_rewards: {len(weights)} weights for {len(reward_fns)} rewards")
    return CombinedReward(reward_fns, weights)
