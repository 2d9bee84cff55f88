"""Peak memory of one RL optimisation step with and without activation checkpointing (+ CPU offload), on CPU.

A Qwen3-shaped model with fewer layers (default 8 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 128, SwiGLU
3072, vocab 151,936, tied embeddings, no softcap) runs chat_rl's `update_policy` (chunked log-probs, policy loss,
backward, optimizer step; AdamW stands in for Muon, see `adamw`) on rollout rows of 1024-4096 tokens (the last
--completion tokens of each row are the sampled completion), once per checkpointing mode, each from the same initial
weights.
Memory is counted in real tensor bytes by the planner's tracker (reasoning.memplan.Session with fake=False: every
storage from allocation to release, the method dev/plan_validate.py checks against the CPU allocator to the byte;
for tied embeddings it counts one fp32 embedding gradient more than an untracked run, see dev/LOG.md), which also
files offloaded block inputs as host memory: the device figure is what a GPU would hold. The accumulated gradients
of every mode are compared with the plain run's (captured at the optimizer step).

    OMP_NUM_THREADS=1 python -m dev.bench_train_memory [--layers 8] [--lengths 1024,2048,4096]
The step runs after a 16-token warm-up update (the optimizer state exists, as from the second step of a run on).
Last line: RESULT act_peak_ratio=<largest activations+logits bytes, off / offload> peak_ratio=<step peak, off /
offload> grads_equal=<every mode's gradient identical to off's>
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from reasoning import memplan
from reasoning.checkpointing import MODES, set_activation_checkpointing
from reasoning.cli import print_result
from reasoning.gpt import GPTConfig
from reasoning.rl import Learner, frozen_logprobs
from reasoning.rollout import TrainingRows
from scripts.chat_rl import RLConfig, needs_frozen_logprobs, update_policy


def qwen_shaped(layers: int, vocab: int, max_len: int) -> GPTConfig:
    return GPTConfig(max_seq_len=max_len, vocab_size=vocab, n_layer=layers, n_head=16, n_kv_head=8, n_embd=1024,
                     head_dim=128, intermediate_size=3072, mlp="swiglu", norm_weight=True, qk_norm_weight=True,
                     tie_embeddings=True, softcap=None, rope_theta=1e6)


def rollout_rows(lengths: list[int], completion: int, vocab: int) -> TrainingRows:
    gen = torch.Generator().manual_seed(0)
    n, width = len(lengths), max(lengths)
    inputs = torch.zeros((n, width), dtype=torch.long)
    targets = torch.full((n, width), -1, dtype=torch.long)
    sampler = torch.zeros((n, width))
    for i, length in enumerate(lengths):
        inputs[i, :length] = torch.randint(0, vocab, (length,), generator=gen)
        targets[i, length - completion:length] = torch.randint(0, vocab, (completion,), generator=gen)
        sampler[i, length - completion:length] = -torch.rand(completion, generator=gen) * 2
    return TrainingRows(inputs, targets, sampler, (targets >= 0).float(), list(lengths))


def adamw(model, lr: float):
    """AdamW over every parameter, shaped like the project's optimizer for update_policy. Muon's Newton-Schulz
    iterations cost ~1 TFLOP per step for these matrices (minutes of a shared CPU) and happen after the backward:
    they do not touch the activation peak, and AdamW's two moments are more state than Muon's one momentum."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    optimizer.reduce_gradients = lambda: None  # one process: nothing to reduce
    return optimizer


def rl_update(learner: Learner, data: TrainingRows, advantages: torch.Tensor, rl_config: RLConfig) -> None:
    """One update over every row, as chat_rl's loop runs it (the no-grad old/reference pass only when needed)."""
    rows = list(range(len(data.lengths)))
    frozen = None
    if needs_frozen_logprobs(rl_config, learner):
        frozen = frozen_logprobs(learner, data, rows, rl_config.device_batch_size, rl_config.temperature,
                                 rl_config.logprob_chunk_size, rl_config.max_tokens_per_micro_batch,
                                 rl_config.matmul_dtype)
    update_policy(learner, data, advantages, rows, frozen, rl_config, 0)


def one_step(config: GPTConfig, mode: str, lengths: list[int], completion: int, rl_config, fake: bool) -> dict:
    with memplan.Session(config, target="cpu", fake=fake) as s:
        data = rollout_rows(lengths, completion, config.vocab_size)  # inside: fake tensors under --fake
        optimizer = adamw(s.model, 1e-5)
        s.tracker.track_optimizer(optimizer)
        set_activation_checkpointing(s.model, mode)
        captured = {}
        original_step = optimizer.step

        def capture_step(*args, **kwargs):
            captured.update({name: p.grad.detach().clone() for name, p in s.model.named_parameters()})
            return original_step(*args, **kwargs)
        optimizer.step = capture_step
        advantages = torch.linspace(-1.0, 1.0, len(data.lengths))
        s.model.train()
        # a 16-token update first creates the optimizer state, so the measured step is a steady-state one
        warmup = rollout_rows([16], 8, config.vocab_size)
        learner = Learner(s.model, optimizer, None, torch.device("cpu"), contextlib.nullcontext)
        rl_update(learner, warmup, torch.ones(1), rl_config)
        captured.clear()
        start = time.perf_counter()
        plan = s.phase("chat_rl", "train", {}, lambda: rl_update(learner, data, advantages, rl_config))
        seconds = time.perf_counter() - start
        host, working = s.tracker.host_peak, s.tracker.working_peak
    b = plan.breakdown
    return {"mode": mode, "total": plan.total, "activations": working, "host": host,
            "static": b["params"] + b["grads"] + b["optimizer"], "seconds": seconds, "grads": captured}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--lengths", default="1024,2048,4096", help="rollout row lengths (tokens)")
    parser.add_argument("--completion", type=int, default=256, help="completion tokens at the end of each row")
    parser.add_argument("--max-tokens", type=int, default=4096, help="--max-tokens-per-micro-batch")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--fake", action="store_true", help="count bytes on fake tensors (no data, no compute: "
                        "seconds instead of CPU-minutes; dev/plan_validate.py shows they match real runs to the byte); "
                        "gradients are not compared")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.lengths.split(",")]
    config = qwen_shaped(args.layers, args.vocab, max(lengths))
    rl_config = RLConfig(loss_type="dapo", device_batch_size=len(lengths), max_tokens_per_micro_batch=args.max_tokens,
                         logprob_chunk_size=256, grad_clip=1.0, max_new_tokens=args.completion)
    results = [one_step(config, mode, lengths, args.completion, rl_config, args.fake)
               for mode in args.modes.split(",")]
    plain = results[0]
    print(f"Qwen3-shaped, {args.layers} layers, rows {lengths} (last {args.completion} tokens sampled), "
          f"micro-batches of <= {args.max_tokens} tokens, fp32 CPU; MiB of {'fake' if args.fake else 'real'} tensors")
    print("| mode | step peak MiB | params+grads+optimizer at it | activations+logits peak | host (offloaded) | s | "
          "grads vs off |")
    print("|---|---|---|---|---|---|---|")
    equal = {}
    for r in results:
        if args.fake:
            verdict = "not compared (fake)"
        else:
            diffs = [float((r["grads"][n] - plain["grads"][n]).abs().max()) for n in plain["grads"]]
            equal[r["mode"]] = all(torch.equal(r["grads"][n], plain["grads"][n]) for n in plain["grads"])
            verdict = "identical" if equal[r["mode"]] else f"max abs diff {max(diffs):.2e}"
        print(f"| {r['mode']} | {r['total'] / 2**20:.0f} | {r['static'] / 2**20:.0f} | "
              f"{r['activations'] / 2**20:.0f} | {r['host'] / 2**20:.0f} | {r['seconds']:.0f} | {verdict} |")
    last = results[-1]
    print_result({"act_peak_ratio": round(plain["activations"] / last["activations"], 2),
                  "peak_ratio": round(plain["total"] / last["total"], 2),
                  "compared": f"{plain['mode']}/{last['mode']}",
                  "grads_equal": all(equal.values()) if equal else "na"})


if __name__ == "__main__":
    main()
