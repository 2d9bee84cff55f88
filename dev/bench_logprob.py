"""Peak memory and time of chunked vs naive per-token log-probs (forward + backward), CPU fp32.

naive   : logits = h @ W^T (B, T, V) → log_softmax → gather; autograd keeps (B, T, V) tensors alive.
chunked : reasoning.grpo.chunked_token_logprobs, which holds at most chunk_size × V floats at a time.

Memory is measured honestly by process isolation: every (variant, repeat) runs in a fresh Python subprocess that
builds the inputs, records ru_maxrss (the kernel's high-water mark of resident memory) as its baseline, runs
forward + backward, and reports the growth of ru_maxrss. Anything either variant allocates (logits, autograd
buffers, gradients, chunk buffers, allocator slack) counts, and nothing from a previous run can hide in the
allocator. Both variants compute grads of h and W, so those buffers are in both deltas.
Variants alternate within each repeat so that load on the (shared) machine hits both alike; figures are medians.
One timed pass per process by default (--iters): glibc serves blocks above 32 MB with fresh mmaps, so the first-touch
page faults of big buffers recur on every training step anyway; the BLAS thread pool is started before timing.
CPU seconds (user+sys) are printed next to wall time because the box is shared.

    python -m dev.bench_logprob                       # B=8 T=2048 V=32768 d=512, 3 repeats
    python -m dev.bench_logprob --B 2 --T 256 --repeats 1   # quick smoke run
Last line: RESULT peak_ratio=<naive/chunked> time_ratio=<chunked/naive>
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(args) -> None:
    import torch

    from reasoning.grpo import chunked_token_logprobs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.B, args.T, args.d, generator=gen).requires_grad_(True)
    weight = (torch.randn(args.V, args.d, generator=gen) * args.d ** -0.5).requires_grad_(True)
    targets = torch.randint(0, args.V, (args.B, args.T), generator=gen)
    upstream = torch.randn(args.B, args.T, generator=gen)
    torch.mm(torch.ones(8, 8), torch.ones(8, 8))        # start the BLAS thread pool before the baseline
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def naive():
        # one expression, so the (B, T, V) logits are not pinned by a Python name beyond what autograd keeps
        logp_all = torch.log_softmax(hidden @ weight.t(), dim=-1)
        return logp_all.gather(-1, targets[..., None]).squeeze(-1)

    def chunked():
        return chunked_token_logprobs(hidden, weight, targets, chunk_size=args.chunk_size)

    fn = naive if args.worker == "naive" else chunked
    times, cpu_times = [], []
    for _ in range(args.iters):
        hidden.grad = weight.grad = None
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        logprobs = fn()
        (logprobs * upstream).sum().backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - cpu_start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_delta_mb": (peak_kb - baseline_kb) / 1024, "times": times, "cpu_times": cpu_times,
                      "checksum": [float(logprobs.detach().double().sum()), float(hidden.grad.double().norm()),
                                   float(weight.grad.double().norm())]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--V", type=int, default=32768)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per variant")
    parser.add_argument("--iters", type=int, default=1, help="fwd+bwd passes per subprocess; the last one is timed")
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    shape = ["--B", str(args.B), "--T", str(args.T), "--V", str(args.V), "--d", str(args.d),
             "--chunk-size", str(args.chunk_size), "--iters", str(args.iters)]
    runs = {"naive": [], "chunked": []}
    for repeat in range(args.repeats):
        order = ["naive", "chunked"] if repeat % 2 == 0 else ["chunked", "naive"]
        for variant in order:
            out = subprocess.run([sys.executable, "-m", "dev.bench_logprob", "--worker", variant, *shape],
                                 capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[variant][-1]
            print(f"repeat {repeat} {variant:8s} peak +{r['peak_delta_mb']:6.0f} MB  "
                  f"wall {' '.join(f'{t:.2f}' for t in r['times'])} s  "
                  f"cpu {' '.join(f'{t:.2f}' for t in r['cpu_times'])} s", flush=True)

    a, b = runs["naive"][0]["checksum"], runs["chunked"][0]["checksum"]
    agree = all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b))
    print(f"\nB={args.B} T={args.T} V={args.V} d={args.d} fp32 CPU, chunk_size={args.chunk_size}, "
          f"{args.repeats} repeats; naive and chunked agree (sum logp, |grad h|, |grad W|): {agree}")
    print(f"{'variant':8s} {'peak MB':>8s} {'wall s':>7s} {'cpu s':>7s}   (medians; last pass of each run)")
    med = {}
    for variant, rs in runs.items():
        med[variant] = [statistics.median(r["peak_delta_mb"] for r in rs),
                        statistics.median(r["times"][-1] for r in rs),
                        statistics.median(r["cpu_times"][-1] for r in rs)]
        print(f"{variant:8s} {med[variant][0]:8.0f} {med[variant][1]:7.2f} {med[variant][2]:7.2f}")
    if not agree:
        raise SystemExit("chunked and naive results disagree")
    print(f"cpu_time_ratio={med['chunked'][2] / med['naive'][2]:.3f} (chunked/naive; less sensitive to a shared box)")
    print(f"RESULT peak_ratio={med['naive'][0] / med['chunked'][0]:.2f} "
          f"time_ratio={med['chunked'][1] / med['naive'][1]:.3f}")


if __name__ == "__main__":
    main()
