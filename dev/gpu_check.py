"""GPU check: attention-kernel parity, fp8-vs-bf16 training parity, pretraining tok/s and MFU, engine benchmark.

Run on a CUDA machine (through dev/gpu_check.sh) after any change to the GPU path; prints one table:

  1. FA3 vs SDPA: `flash_attention.attention` forward and q-gradient with each backend on the same bf16 inputs,
     causal and sliding-window; max abs difference (FA3 needs the kernel hub: offline it reports "unavailable").
  2. fp8 vs bf16: the same depth-12 pretraining run (reasoning.pretrain.train, compiled) with and without fp8;
     mean loss of the last steps, relative difference.
  3. Throughput: tok/s and MFU (bf16 peak, reasoning.mfu) of depth 12 and 20, bf16 and fp8, compiled, median-free
     steady-state mean over the steps after compilation (what `train` reports).
  4. `dev/bench_engine.py --device cuda` (on CPU in a dry run: --device cpu) in a subprocess, in the compute
     dtype reasoning.common picks (bf16 on sm80+); the command is printed, the table shows its RESULT line.

Data: the offline synthetic corpus and a tokenizer trained on it, written to a temp dir (or --data-dir and
--tokenizer-dir); the model vocabulary is padded to --vocab-size (default 65536) so lm_head costs what it costs in
a real run. `--dry-run` runs every part at micro scale on whatever device there is (CPU: no compile, fp8 through
the CPU `_scaled_mm`, no FA3), to check the script itself.

    bash dev/gpu_check.sh                 # full check on a GPU (~10 min on one H100)
    python -m dev.gpu_check --dry-run     # seconds-to-minutes on CPU
Last line: RESULT fa3_max_diff=... fp8_loss_rel_diff=... d12_tok_s=... d12_mfu=... d20_tok_s=... d20_mfu=...
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare_data(workdir: str, data_dir: str | None, tokenizer_dir: str | None, num_shards: int) -> tuple[str, str]:
    """(data_dir, tokenizer_dir): the given ones, or the synthetic corpus and a tokenizer trained on it."""
    from reasoning.dataset import iter_documents
    from reasoning.tokenizer import train_tokenizer
    from tasks.synthetic import write_synthetic_corpus

    if data_dir is None:
        data_dir = os.path.join(workdir, "data")
        write_synthetic_corpus(data_dir, num_shards=num_shards, docs_per_shard=2000, seed=0)
    if tokenizer_dir is None:
        tokenizer_dir = os.path.join(workdir, "tokenizer")
        train_tokenizer(iter_documents(data_dir, split="train"), 4096).save(tokenizer_dir)
    return data_dir, tokenizer_dir


def attention_parity(seq_len: int) -> dict:
    """Max |FA3 - SDPA| over outputs and q-gradients, causal and windowed; None when FA3 cannot run here."""
    from reasoning import flash_attention as fa

    if not torch.cuda.is_available():
        return {"status": "skipped (no CUDA)", "max_diff": None}
    if fa.resolve_backend("cuda", torch.bfloat16) != "fa3":
        return {"status": f"unavailable ({fa._fa3_error})", "max_diff": None}
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (2, seq_len, 8, 128), (2, seq_len, 2, 128)  # GQA: 8 query heads on 2 kv heads
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad_out = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=gen)
    worst = 0.0
    try:
        for window in (None, seq_len // 4):
            results = []
            for backend in ("fa3", "sdpa"):
                fa.set_backend(backend)
                q_leaf = q.clone().requires_grad_(True)
                out = fa.attention(q_leaf, k, v, causal=True, window=window)
                out.backward(grad_out)
                results.append((out.float(), q_leaf.grad.float()))
            (out_a, grad_a), (out_b, grad_b) = results
            worst = max(worst, (out_a - out_b).abs().max().item(), (grad_a - grad_b).abs().max().item())
    finally:
        fa.set_backend("auto")
    # bf16 outputs of O(1) values: a few ulps (1/128 each) of disagreement is expected, not more
    return {"status": "ok" if worst < 5e-2 else "MISMATCH", "max_diff": worst}


def pretrain_run(depth: int, fp8: bool, steps: int, args, data_dir: str, tokenizer_dir: str, workdir: str) -> dict:
    from reasoning.pretrain import TrainConfig, train

    cuda = torch.cuda.is_available()
    config = TrainConfig(depth=depth, max_seq_len=args.seq_len, device_batch_size=args.device_batch_size,
                         num_iterations=steps, vocab_size=args.vocab_size, compile=cuda and not args.no_compile,
                         fp8=fp8, fp8_min_dim=16 if args.dry_run else 128, eval_every=-1, sample_every=-1,
                         save_every=-1, log_every=max(1, steps // 5), data_dir=data_dir, tokenizer_dir=tokenizer_dir,
                         base_dir=workdir, tag=f"gpu_check_d{depth}_{'fp8' if fp8 else 'bf16'}",
                         warmdown_ratio=0.0)  # constant lr: the compared losses are not at a schedule's tail
    summary = train(config)
    tail = [loss for _, loss in summary["losses"][-max(1, steps // 10):]]
    m = summary["metrics"]
    if cuda:
        torch.cuda.empty_cache()
    return {"depth": depth, "fp8": fp8, "fp8_layers": summary["fp8_layers"], "tok_per_s": m["tok_per_s"],
            "mfu": m["mfu"], "loss": sum(tail) / len(tail)}


def engine_benchmark(dry_run: bool, device: str) -> str:
    cmd = [sys.executable, "-m", "dev.bench_engine", "--device", device]
    cmd += ["--prompts", "4", "--new-tokens", "8", "--rounds", "1", "--sequential-prompts", "2",
            "--skip", "retirement"] if dry_run else ["--rounds", "3"]
    print(f"engine benchmark: {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        return f"failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return lines[-1][len("RESULT "):]


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="micro sizes on any device, to test the script")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="throughput depths (default 12 20)")
    parser.add_argument("--parity-depth", type=int, default=None, help="fp8-vs-bf16 depth (default 12)")
    parser.add_argument("--parity-steps", type=int, default=None, help="steps of the parity runs (default 150)")
    parser.add_argument("--speed-steps", type=int, default=None, help="steps of the throughput runs (default 30)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048")
    parser.add_argument("--device-batch-size", type=int, default=None, help="default 16")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="model vocab, padded (default 65536; -1: the tokenizer's)")
    parser.add_argument("--no-compile", action="store_true", help="eager mode (compile is on by default on CUDA)")
    parser.add_argument("--skip-engine", action="store_true", help="leave out dev/bench_engine.py")
    parser.add_argument("--data-dir", default=None, help="parquet shards (default: synthetic corpus in a temp dir)")
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer (default: trained on the data)")
    args = parser.parse_args()
    micro = args.dry_run
    defaults = dict(depths=[2] if micro else [12, 20], parity_depth=2 if micro else 12,
                    parity_steps=12 if micro else 150, speed_steps=8 if micro else 30, seq_len=64 if micro else 2048,
                    device_batch_size=4 if micro else 16, vocab_size=-1 if micro else 65536)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not micro and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: run on a GPU machine, or pass --dry-run to check the script on CPU")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"gpu_check on {device}{' (dry run: micro sizes)' if micro else ''}", flush=True)
    rows = []  # (check, value, status)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        data_dir, tokenizer_dir = prepare_data(workdir, args.data_dir, args.tokenizer_dir, 3 if micro else 8)

        attn = attention_parity(256 if micro else 2048)
        rows.append(("FA3 vs SDPA max |diff| (out, dq)", _fmt(attn["max_diff"], ".2e"), attn["status"]))

        runs = {}  # (depth, fp8) -> result; the parity runs double as the throughput runs of their depth

        def run(depth: int, use_fp8: bool, steps: int) -> dict | None:
            if (depth, use_fp8) not in runs:
                try:
                    runs[(depth, use_fp8)] = pretrain_run(depth, use_fp8, steps, args, data_dir, tokenizer_dir,
                                                          workdir)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    runs[(depth, use_fp8)] = None  # reported as OOM; lower --device-batch-size
            return runs[(depth, use_fp8)]

        bf16 = run(args.parity_depth, False, args.parity_steps)
        fp8 = run(args.parity_depth, True, args.parity_steps)
        rel = abs(fp8["loss"] - bf16["loss"]) / bf16["loss"] if bf16 and fp8 else None
        rows.append((f"d{args.parity_depth} loss bf16 / fp8 ({args.parity_steps} steps)",
                     f"{bf16['loss']:.4f} / {fp8['loss']:.4f} ({100 * rel:.2f}%)" if rel is not None else "OOM",
                     "ok" if rel is not None and rel < 0.03 and fp8["fp8_layers"] > 0 else "CHECK"))
        for depth in args.depths:
            for use_fp8 in (False, True):
                r = run(depth, use_fp8, args.speed_steps)
                label = f"d{depth} {'fp8 ' if use_fp8 else 'bf16'} tok/s | MFU (bf16 peak)"
                if r is None:
                    rows.append((label, f"OOM at --device-batch-size {args.device_batch_size}", "CHECK"))
                    continue
                mfu_text = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                rows.append((label, f"{_fmt(r['tok_per_s'], ',.0f')} | {mfu_text}",
                             f"{r['fp8_layers']} fp8 layers" if use_fp8 else ""))

    if not args.skip_engine:
        engine_device = "cuda" if torch.cuda.is_available() else "cpu"
        rows.append((f"dev/bench_engine.py --device {engine_device}", engine_benchmark(micro, engine_device), ""))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'value':<36}  status")
    for check, value, status in rows:
        print(f"{check:<{width}}  {value:<36}  {status}")
    figures = [f"fa3_max_diff={_fmt(attn['max_diff'], '.3e')}", f"fp8_loss_rel_diff={_fmt(rel, '.4f')}"]
    for depth in args.depths:
        r = runs.get((depth, False)) or {"tok_per_s": None, "mfu": None}
        figures += [f"d{depth}_tok_s={_fmt(r['tok_per_s'], '.0f')}", f"d{depth}_mfu={_fmt(r['mfu'], '.4f')}"]
    print("RESULT " + " ".join(figures))

if __name__ == "__main__":
    main()
