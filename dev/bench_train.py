"""Benchmark: CPU pretraining throughput and MFU for depths 2/4/6, one optimizer step split into its phases.

For each depth: a GPT from `gpt.config_from_depth(depth, vocab, max_seq_len=256)`, the Muon+AdamW optimizer of
`GPT.setup_optimizer`, fixed random token batches of `--batch-size` rows × 256 tokens. Each step is timed in three
parts -- forward (summed loss, as the trainer computes it), backward, optimizer step -- and the table reports the
median over `--steps` steps after `--warmup` untimed ones. MFU = GPT.estimate_flops() × tokens/s ÷ the measured
fp32 matmul peak of this process (reasoning.mfu), re-measured after the depths and the larger of the two kept, so
a busy machine is judged against what it could do in the same run.

With `--compile` every depth also runs a torch.compile'd copy of the same model (same weights, same batches, its
own optimizer; `--compile-backend`, inductor by default): the eager and compiled steps alternate, so both see the
same machine load, and the table gains a compiled row and the ratio. Compilation happens in the warmup steps.

    python -m dev.bench_train                      # depths 2 4 6, batch 4, 5 timed steps, torch's thread count
    python -m dev.bench_train --threads 1 --steps 7
    python -m dev.bench_train --compile --depths 2 4
Last line: RESULT tok_per_s=<depth 4> mfu=<depth 4> [tok_per_s_compiled=<depth 4> compile_speedup=<ratio>]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reasoning.gpt import GPT, config_from_depth
from reasoning.mfu import measure_cpu_matmul_flops


def time_steps(depth: int, vocab: int, max_seq_len: int, batch_size: int, warmup: int, steps: int,
               compile_backend: str | None = None) -> list[dict]:
    """Median seconds of forward / backward / optimizer over `steps` steps, plus model facts: one row for the eager
    model and, with `compile_backend`, one for its compiled twin (steps of the two alternate)."""
    modes = ["eager"] + (["compiled"] if compile_backend else [])
    runs = {}
    for mode in modes:
        torch.manual_seed(0)  # the same initial weights for both
        model = GPT(config_from_depth(depth, vocab, max_seq_len=max_seq_len))
        model.init_weights()
        forward = torch.compile(model, dynamic=False, backend=compile_backend) if mode == "compiled" else model
        runs[mode] = (model, forward, model.setup_optimizer(), {"forward": [], "backward": [], "optimizer": []})
    gen = torch.Generator().manual_seed(depth)
    inputs = torch.randint(0, vocab, (batch_size, max_seq_len), generator=gen)
    targets = torch.randint(0, vocab, (batch_size, max_seq_len), generator=gen)
    for i in range(warmup + steps):
        for mode in modes:
            model, forward, optimizer, phases = runs[mode]
            t0 = time.perf_counter()
            loss = forward(inputs, targets, loss_reduction="sum") / targets.numel()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if i >= warmup:
                for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                    phases[name].append(dt)
    rows = []
    for mode in modes:
        model, _, _, phases = runs[mode]
        med = {name: statistics.median(times) for name, times in phases.items()}
        totals = [sum(parts) for parts in zip(*phases.values())]
        rows.append(dict(depth=depth, mode=mode, width=model.config.n_embd, params=model.num_params(),
                         flops_per_token=model.estimate_flops(), step=statistics.median(totals), **med))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096, help="the CPU pipeline's tokenizer size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd copy, side by side")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    peak_before = measure_cpu_matmul_flops(num_threads=threads)
    rows = [row for d in args.depths
            for row in time_steps(d, args.vocab_size, args.max_seq_len, args.batch_size, args.warmup, args.steps,
                                  args.compile_backend if args.compile else None)]
    measure_cpu_matmul_flops.cache_clear()  # a second, independent measurement after the load of the runs
    peak = max(peak_before, measure_cpu_matmul_flops(num_threads=threads))

    tokens = args.batch_size * args.max_seq_len
    print(f"CPU, {threads} threads, fp32, batch {args.batch_size} × {args.max_seq_len} tokens, vocab {args.vocab_size}, "
          f"median of {args.steps} steps; matmul peak {peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f})")
    print(f"{'depth':>5} {'mode':>8} {'width':>5} {'params':>10} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} "
          f"{'step ms':>8} {'tok/s':>8} {'MFU':>7}")
    results = {}
    for r in rows:
        tok_per_s = tokens / r["step"]
        mfu = r["flops_per_token"] * tok_per_s / peak
        results[r["depth"], r["mode"]] = (tok_per_s, mfu)
        print(f"{r['depth']:>5} {r['mode']:>8} {r['width']:>5} {r['params']:>10,} {1e3 * r['forward']:>8.1f} "
              f"{1e3 * r['backward']:>8.1f} {1e3 * r['optimizer']:>8.1f} {1e3 * r['step']:>8.1f} "
              f"{tok_per_s:>8.0f} {100 * mfu:>6.1f}%")
        if r["mode"] == "compiled":
            print(f"{'':>5} {'ratio':>8} compiled / eager tok/s = "
                  f"{tok_per_s / results[r['depth'], 'eager'][0]:.2f}")
    key = 4 if 4 in args.depths else args.depths[0]
    line = f"RESULT tok_per_s={results[key, 'eager'][0]:.0f} mfu={results[key, 'eager'][1]:.4f}"
    if args.compile:
        compiled = results[key, "compiled"][0]
        line += f" tok_per_s_compiled={compiled:.0f} compile_speedup={compiled / results[key, 'eager'][0]:.3f}"
    print(line)


if __name__ == "__main__":
    main()
