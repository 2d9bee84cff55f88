"""Benchmark: batched evaluation generation vs one problem at a time, same tiny random model, same outputs.

    .venv/bin/python -m dev.bench_eval                       # 64 MATH-500 problems, greedy, 128 new tokens
    .venv/bin/python -m dev.bench_eval --rounds 3 --batch-size 64 --data-path ../shared/data

What is measured: the reasoning.engine.Engine calls chat_eval makes (ragged chat prompts, greedy decoding), once as
a single call of `batch-size` prompts and once as one call per prompt, interleaved per round; prompts are built
outside the timed region and grading is not timed (it is the same work either way). Outputs must be token-identical.
Model: random GPT (tests/helpers_models.tiny_model: depth 2, width 64, context 2048) with the small BPE tokenizer
trained on synthetic text (vocab 512). Prints medians; last line `RESULT speedup=<x> identical=<1|0>`.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the tiny model builders live with the tests that share them

from helpers_models import tiny_model, train_small_tokenizer  # noqa: E402
from reasoning.engine import Engine  # noqa: E402
from reasoning.evaluation import build_prompt  # noqa: E402
from tasks.registry import build_task  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default=os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_small_tokenizer(os.path.join(tmp, "tokenizer"))
    model = tiny_model(tokenizer.vocab_size, depth=2, n_embd=64, max_seq_len=2048).eval()
    task = build_task("MATH-500", "test", data_path=args.data_path)
    prompts = [build_prompt(tokenizer, task[i], "chat") for i in range(args.problems)]
    engine = Engine(model, tokenizer)
    print(f"{len(prompts)} MATH-500 prompts, {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
          f"(mean {sum(map(len, prompts)) / len(prompts):.0f}); greedy, {args.max_tokens} new tokens; "
          f"{torch.get_num_threads()} threads")

    def batched():
        out = []
        for start in range(0, len(prompts), args.batch_size):
            out += engine.generate(prompts[start:start + args.batch_size], max_tokens=args.max_tokens,
                                   temperature=0.0)
        return [g.tokens for g in out]

    def one_at_a_time():
        return [engine.generate([p], max_tokens=args.max_tokens, temperature=0.0)[0].tokens for p in prompts]

    times = {"batched": [], "one-at-a-time": []}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn in (("batched", batched), ("one-at-a-time", one_at_a_time)):
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    identical = outputs["batched"] == outputs["one-at-a-time"]
    tokens = sum(len(t) for t in outputs["batched"])
    print(f"\n| mode | median s | rounds (s) | new tokens | tok/s |\n|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} (B={args.batch_size if name == 'batched' else 1}) | {median:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} | {tokens} | {tokens / median:.0f} |")
    speedup = statistics.median(times["one-at-a-time"]) / statistics.median(times["batched"])
    print(f"\nspeedup {speedup:.1f}x, outputs identical: {identical}")
    print(f"RESULT speedup={speedup:.2f} identical={int(identical)}")


if __name__ == "__main__":
    main()
