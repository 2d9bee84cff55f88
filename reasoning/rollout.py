"""The RL batch: which prompts a step samples, the sampled group of completions with rewards and advantages, and
its layout for the trainer.

Why its own module: reasoning/rl.py is the optimisation loop; this is the data it optimises on. Three pieces:
  - `PromptStream`: an endless, epoch-shuffled stream over a Task whose position is one integer (exact resume,
    disjoint slices per rank).
  - `collect_rollout`: G samples per prompt from reasoning.engine.Engine (with the sampler's per-token log-probs),
    scored by reasoning.rewards, advantages from reasoning.grpo.group_advantages.
  - `training_rows`: prompt + completion rows, right-padded, with targets only where the policy sampled a token
    (forced tool output is not the policy's decision) and the sampler's log-probs aligned to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reasoning.common import UserError
from reasoning.grpo import group_advantages, mask_truncated_rows


class PromptStream:
    """The endless, epoch-shuffled stream of train prompts. `cursor` = prompts consumed by all ranks together;
    a step takes `per_step` of them and rank r owns the r-th contiguous slice."""

    def __init__(self, task, seed: int, cursor: int = 0):
        if len(task) == 0:
            raise UserError("the RL task has no train prompts")
        self.task, self.seed, self.cursor = task, seed, cursor
        self._epoch, self._order = None, None

    def _index(self, g: int) -> int:
        epoch, offset = divmod(g, len(self.task))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.task))
        return int(self._order[offset])

    def next_examples(self, per_step: int, rank: int, world_size: int) -> list[dict]:
        per_rank = per_step // world_size
        first = self.cursor + rank * per_rank
        examples = [self.task[self._index(g)] for g in range(first, first + per_rank)]
        self.cursor += per_step
        return examples


@dataclass
class Rollout:
    """One rank's rollout batch: P prompts x G samples, rows prompt-major."""
    examples: list[dict]         # the P prompts that were sampled (too-long ones are left out)
    prompts: list[list[int]]
    generations: list            # list[reasoning.engine.Generation], N = P * G
    texts: list[str]
    rewards: torch.Tensor        # (N,) float32 weighted total
    parts: dict                  # reward name -> (N,) float32 unweighted values
    advantages: torch.Tensor     # (N,) float32
    zero_variance: torch.Tensor  # (P,) bool
    skipped: int = 0             # prompts left out: no room for a completion in the model's context


def collect_rollout(engine, tokenizer, examples: list[dict], reward, num_samples: int, max_new_tokens: int,
                    temperature: float, seed: int, top_k: int | None = None, std_normalize: bool = True) -> Rollout:
    """Sample `num_samples` (G) completions per example, score them with `reward` (a rewards.CombinedReward), and
    compute group advantages (std-normalised unless `std_normalize` is False).

    A prompt that leaves no room for a completion in the model's context is left out (counted in `skipped`)
    rather than stopping the run; the rollout may then be empty, which the update handles."""
    from reasoning.evaluation import completion_text
    from reasoning.rewards import Completion

    G = num_samples
    context = engine.model.config.max_seq_len
    rendered = [tokenizer.render_for_completion({"messages": ex["messages"]}) for ex in examples]
    fits = [i for i, p in enumerate(rendered) if len(p) < context]
    examples, prompts = [examples[i] for i in fits], [rendered[i] for i in fits]
    generations = []
    if prompts:
        was_training = engine.model.training
        engine.model.eval()
        try:
            generations = engine.generate(prompts, num_samples=G, max_tokens=max_new_tokens,
                                          temperature=temperature, top_k=top_k, seed=seed)
        finally:
            engine.model.train(was_training)
    texts = [completion_text(tokenizer, g.tokens, g.stop_reason, "chat") for g in generations]
    completions = [Completion(text=t, num_tokens=len(g.tokens), truncated=g.stop_reason != "stop")
                   for t, g in zip(texts, generations)]
    breakdown = reward(completions, [examples[g.prompt_index] for g in generations])
    rewards = torch.tensor(breakdown.total, dtype=torch.float32)
    parts = {name: torch.tensor(values, dtype=torch.float32) for name, values in breakdown.parts.items()}
    if generations:
        advantages, zero_variance = group_advantages(rewards, G, normalize_std=std_normalize)
    else:
        advantages, zero_variance = torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return Rollout(examples, prompts, generations, texts, rewards, parts, advantages, zero_variance,
                   skipped=len(rendered) - len(prompts))


@dataclass
class TrainingRows:
    """The rollout laid out for the trainer, (N, T) right-padded; column t predicts token t + 1."""
    inputs: torch.Tensor            # (N, T) long
    targets: torch.Tensor           # (N, T) long, -1 except at sampled completion tokens
    sampler_logprobs: torch.Tensor  # (N, T) float32, engine log-probs at the target positions (0 elsewhere)
    mask: torch.Tensor              # (N, T) float32, 1 where the token takes part in the loss
    lengths: list[int]              # input length of each row (for trimming micro-batches)


def training_rows(prompts: list[list[int]], generations: list, mask_truncated: bool) -> TrainingRows:
    """Rows of prompt + completion. Only tokens the policy sampled are targets (forced tool output is not)."""
    lengths = [max(1, len(prompts[g.prompt_index]) + len(g.tokens) - 1) for g in generations]
    N, T = len(generations), max(lengths, default=1)
    inputs = torch.zeros((N, T), dtype=torch.long)
    targets = torch.full((N, T), -1, dtype=torch.long)
    sampler = torch.zeros((N, T), dtype=torch.float32)
    for i, g in enumerate(generations):
        prompt = prompts[g.prompt_index]
        full = prompt + g.tokens
        inputs[i, :lengths[i]] = torch.tensor(full[:lengths[i]], dtype=torch.long)
        if g.tokens:
            start = len(prompt) - 1  # the last prompt position predicts the first completion token
            n = len(g.tokens)
            sampled = torch.tensor(g.mask, dtype=torch.bool)
            targets[i, start:start + n] = torch.where(sampled, torch.tensor(g.tokens), -1)
            sampler[i, start:start + n] = torch.tensor(g.logprobs, dtype=torch.float32)
    mask = (targets >= 0).float()
    if mask_truncated:
        mask = mask_truncated_rows(mask, [g.stop_reason != "stop" for g in generations])
    return TrainingRows(inputs, targets, sampler, mask, lengths)
