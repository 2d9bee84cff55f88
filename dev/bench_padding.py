"""Padding waste of training micro-batches: fixed row counts vs token budgets (reasoning.microbatch).

Waste = padded slots / all slots, each micro-batch padded to its own longest row. Two length distributions:
  (a) rollout rows of a synthetic RL run (prompt + completion - 1 tokens, what chat_rl's update trains on), sampled
      with the engine from a checkpoint (--checkpoint DIR: e.g. runcpu's rl or sft checkpoint; skipped without it);
  (b) heavy-tailed reasoning traces: 92% lognormal around 700 tokens (5-95%: ~290-1700), 8% long ones around 3000,
      cut at 8192 (the truncated tail of long-context RL), 512 rows (64 prompts x 8 samples of one rank).
Ways of forming micro-batches, each with the same rows:
  fixed, arrival order   --device-batch-size rows in the order they come (SFT's stream order, a plain trainer);
  fixed, sorted          --device-batch-size rows after sorting by length (RL's order before and after this change);
  token budget           --max-tokens-per-micro-batch, sorted, at most --max-rows rows (reasoning.microbatch).

    python -m dev.bench_padding [--checkpoint ~/.cache/reasoning/runcpu/checkpoints/rl/d2]
Last line: RESULT pad_waste_before=<fixed, arrival order, (b)> pad_waste_after=<token budget, (b)> ...
"""

from __future__ import annotations

import argparse

import numpy as np

from reasoning.microbatch import micro_batches, padding_waste
from reasoning.cli import print_result


def heavy_tailed_lengths(n: int, seed: int = 0, cap: int = 8192) -> list[int]:
    rng = np.random.default_rng(seed)
    long = rng.random(n) < 0.08
    lengths = np.where(long, rng.lognormal(np.log(3000), 0.5, n), rng.lognormal(np.log(700), 0.55, n))
    return [int(x) for x in np.clip(lengths, 32, cap)]


def rollout_lengths(checkpoint: str, steps: int, prompts: int, samples: int, max_new_tokens: int) -> list[int]:
    """Row lengths of `steps` rollouts of the synthetic task (runcpu's clean recipe: preset twostep)."""
    from reasoning import checkpoint as ckpt
    from reasoning.engine import Engine
    from reasoning.rollout import sample_groups, training_rows
    from tasks.synthetic import SyntheticReasoning

    model, tokenizer, _ = ckpt.load_model(checkpoint, device="cpu")
    task = SyntheticReasoning("train", size=prompts * steps, seed=0, difficulty="twostep")
    engine = Engine(model, tokenizer)
    lengths = []
    for step in range(steps):
        examples = [task[i] for i in range(step * prompts, (step + 1) * prompts)]
        batch = sample_groups(engine, tokenizer, examples, step, num_samples=samples, max_new_tokens=max_new_tokens,
                              temperature=1.0)  # lengths only: no reward needed
        lengths += training_rows(batch.prompts, batch.generations, False).lengths
    return lengths


def compare(lengths: list[int], rows: int, budget: int, max_rows: int) -> dict:
    order = list(range(len(lengths)))
    arrival = [order[i:i + rows] for i in range(0, len(order), rows)]
    return {
        "fixed_arrival": (padding_waste(lengths, arrival), len(arrival)),
        "fixed_sorted": (padding_waste(lengths, micro_batches(lengths, order, rows)), len(arrival)),
        "budget": (padding_waste(lengths, groups := micro_batches(lengths, order, max_rows, budget)), len(groups)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir for (a), e.g. runcpu's rl/d2")
    parser.add_argument("--steps", type=int, default=4, help="(a): rollouts of 16 prompts x 8 samples, 64 new tokens")
    parser.add_argument("--rows", type=int, default=8, help="--device-batch-size of the fixed-row micro-batches")
    parser.add_argument("--budget", type=int, default=16384, help="(b): --max-tokens-per-micro-batch")
    parser.add_argument("--max-rows", type=int, default=64, help="(b): row cap of the token-budget micro-batches")
    args = parser.parse_args(argv)
    cases = {}
    if args.checkpoint:
        lengths = rollout_lengths(args.checkpoint, args.steps, 16, 8, 64)
        # the same average rows per micro-batch as the fixed path: budget = rows x mean length
        budget = int(args.rows * float(np.mean(lengths)))
        cases["(a) synthetic rollouts"] = (lengths, compare(lengths, args.rows, budget, 4 * args.rows), budget)
    lengths = heavy_tailed_lengths(512)
    cases["(b) heavy-tailed traces"] = (lengths, compare(lengths, args.rows, args.budget, args.max_rows), args.budget)
    print("| lengths | rows | median / p90 / max | fixed rows, arrival order | fixed rows, sorted | token budget |")
    print("|---|---|---|---|---|---|")
    for name, (lengths, result, budget) in cases.items():
        cells = [f"{result[k][0]:.3f} ({result[k][1]} mb)" for k in ("fixed_arrival", "fixed_sorted", "budget")]
        print(f"| {name} | {len(lengths)} | {int(np.median(lengths))} / {int(np.percentile(lengths, 90))} / "
              f"{max(lengths)} | " + " | ".join(cells[:2]) + f" | {cells[2]}, budget {budget} |")
    heavy = cases["(b) heavy-tailed traces"][1]
    synthetic = cases.get("(a) synthetic rollouts")
    print_result({"pad_waste_before": round(heavy["fixed_arrival"][0], 3),
                  "pad_waste_sorted": round(heavy["fixed_sorted"][0], 3),
                  "pad_waste_after": round(heavy["budget"][0], 3),
                  "synthetic_before": round(synthetic[1]["fixed_arrival"][0], 3) if synthetic else "na",
                  "synthetic_after": round(synthetic[1]["budget"][0], 3) if synthetic else "na"})


if __name__ == "__main__":
    main()
