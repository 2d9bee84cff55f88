"""GPU check for the first GPU: the real stages for a few steps each under torchrun (NCCL), checked against what the
CPU-only tools predicted. Run through dev/gpu_check.sh; under 8 minutes on one 8×H100/H200 node (NPROC=2 by
default: base_train needs two ranks to exercise the collectives; NPROC=1 on a single GPU).

  1. data: the offline synthetic corpus and a 4096-token tokenizer trained on it (the model keeps that vocabulary:
     a model padded past its tokenizer samples ids the tokenizer cannot decode, and RL/eval then stop with a
     KeyError — seen in the dry run; so the lm_head is 8x smaller than the speedrun's 32768);
  2. `base_train` at the real depth-20 shape (2048 tokens per row, auto device batch size) for a few steps, then
     `chat_sft` (packed 2048-token rows), `chat_rl` and `chat_eval` (synthetic task) for a few steps each, every one
     launched with torchrun exactly as runs/speedrun.sh launches it;
  3. from each stage's output: the memory plan it printed at startup (reasoning.memplan, the largest phase) against
     its `max_mem_gib` (torch.cuda.max_memory_allocated of rank 0, in its RESULT line), the FA3 and SDPA call counts
     of the model's own attention (reasoning.flash_attention.CALLS, eager forwards: a compiled forward is not
     counted, so base_train also samples at the end; FA3 must have been taken, and SDPA never, on Hopper), and
     base_train's tok/s and MFU;
  4. FA3 vs SDPA numerical parity on the same bf16 inputs (a direct call: parity only, not proof of use) and,
     with --engine, dev/bench_engine.py --device cuda.

    bash dev/gpu_check.sh                  # on a CUDA machine
    NPROC=1 bash dev/gpu_check.sh          # one GPU
    python -m dev.gpu_check --dry-run      # micro sizes on CPU with gloo ranks: checks the script itself
Last line: RESULT stages_ok=<n>/<m> fa3_in_model=<yes|no|na> base_tok_s=... base_mfu=... mem_ratio_max=...
(mem_ratio = measured peak / planned peak; the plan is an upper bound for RL, whose log-prob pass plans every
position as a completion token.)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_LINE = re.compile(r"memory plan: (.*) of ([\d.]+) GiB per GPU")
PHASE = re.compile(r"(\w+) ([\d.]+) GiB")


def parse_result(output: str) -> dict:
    """key=value pairs of the last RESULT line of a stage's output ({} if none)."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {}
    return dict(item.split("=", 1) for item in lines[-1][len("RESULT "):].split() if "=" in item)


def parse_plan(output: str) -> float | None:
    """GiB of the largest phase in the last 'memory plan:' line a stage printed at startup (None: no plan ran)."""
    lines = PLAN_LINE.findall(output)
    if not lines:
        return None
    return max(float(gib) for _, gib in PHASE.findall(lines[-1][0]))


def stage_commands(micro: bool) -> list[tuple[str, str]]:
    """(stage module, flags) in pipeline order; the model has the speedrun's depth-20 shape (width, heads, 2048-token
    rows) unless micro."""
    if micro:
        shape = "--depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024"
        sft_len, rl, evals = "--max-seq-len 128", "--max-new-tokens 16 --prompts-per-step 4", "--max-tokens 16"
    else:
        shape = "--depth 20 --max-seq-len 2048"
        sft_len, rl, evals = "--max-seq-len 2048", "--max-new-tokens 256 --prompts-per-step 16", "--max-tokens 256"
    return [
        # --sample-every 0: greedy samples at the end, an eager forward (counted) even when training is compiled
        ("base_train", f"{shape} --tag gpucheck --num-iterations 12 --eval-every -1 --sample-every 0 "
                       "--sample-tokens 8 --log-every 1"),
        ("chat_sft", f"--stage base --tag gpucheck --task synthetic --pack {sft_len} --num-iterations 6 "
                     "--val-examples 16 --eval-every -1"),
        ("chat_rl", f"--stage sft --tag gpucheck --task synthetic {rl} --num-samples 8 --num-steps 3 "
                    "--eval-every -1"),
        ("chat_eval", f"--stage rl --tag gpucheck -a synthetic --max-problems 64 --batch-size 32 {evals}"),
    ]


def check_row(stage: str, result: dict, planned: float | None, cuda: bool, hopper: bool) -> dict:
    """One stage's verdict: it ran (a RESULT line), memory measured vs planned (CUDA), FA3 inside the model (Hopper)."""
    measured = float(result["max_mem_gib"]) if "max_mem_gib" in result else None
    ratio = measured / planned if measured is not None and planned else None
    # the plan models eager bf16 autocast with no allocator slack: a compiled run should land below it, an eager one
    # near it; more than 10% above means the plan misses something (RL's plan is an upper bound: no lower limit)
    memory_ok = not cuda or (ratio is not None and ratio <= 1.10 and (stage == "chat_rl" or ratio >= 0.3))
    fa3, sdpa = int(result.get("attn_fa3", 0)), int(result.get("attn_sdpa", 0))
    attention_ok = fa3 > 0 and sdpa == 0 if hopper else True
    return {"stage": stage, "planned": planned, "measured": measured, "ratio": ratio, "fa3": fa3, "sdpa": sdpa,
            "ok": bool(result) and memory_ok and attention_ok, "result": result}


def _fmt(value, spec: str) -> str:
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())  # keep a column's width for "na"
    return format("na", f">{width}") if value is None else format(value, spec)


def run_stage(launcher: list[str], stage: str, flags: str, env: dict, log_dir: str) -> tuple[str, float]:
    cmd = [*launcher, "-m", f"scripts.{stage}", "--", *shlex.split(flags)]
    print(f"$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    with open(os.path.join(log_dir, f"{stage}.log"), "w") as f:
        f.write(output)
    if proc.returncode != 0:
        print(f"  {stage} failed (exit {proc.returncode}): " + " | ".join(output.strip().splitlines()[-3:]))
    return output, seconds


def attention_parity(max_seq_len: int) -> tuple[str, float | None]:
    """Max |FA3 - SDPA| over outputs and q-gradients on the same bf16 inputs (a direct call: parity only)."""
    from reasoning import flash_attention as fa

    if not torch.cuda.is_available():
        return "skipped (no CUDA)", None
    if fa.resolve_backend("cuda", torch.bfloat16) != "fa3":
        return f"unavailable ({fa._fa3_error})", None
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn((2, max_seq_len, 8, 128), device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn((2, max_seq_len, 2, 128), device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    worst = 0.0
    try:
        for window in (None, max_seq_len // 4):
            results = []
            for backend in ("fa3", "sdpa"):
                fa.set_backend(backend)
                q_leaf = q.clone().requires_grad_(True)
                out = fa.attention(q_leaf, k, v, causal=True, window=window)
                out.float().square().sum().backward()
                results.append((out.float(), q_leaf.grad.float()))
            (out_a, grad_a), (out_b, grad_b) = results
            worst = max(worst, (out_a - out_b).abs().max().item(), (grad_a - grad_b).abs().max().item())
    finally:
        fa.set_backend("auto")
    return ("ok" if worst < 5e-2 else "MISMATCH"), worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="micro sizes on CPU with gloo ranks")
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", "2")),
                        help="ranks (default $NPROC or 2)")
    parser.add_argument("--engine", action="store_true", help="also run dev/bench_engine.py --device cuda")
    parser.add_argument("--keep", default=None, help="run folder to keep (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        sys.exit("error: no CUDA device: run on a GPU machine, or pass --dry-run to check the script on CPU")
    hopper = cuda and torch.cuda.get_device_capability() == (9, 0)
    print(f"gpu_check on {torch.cuda.get_device_name() if cuda else 'cpu'}, {args.nproc} rank(s)"
          + (" (dry run: micro sizes)" if args.dry_run else ""), flush=True)

    workdir = args.keep or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(workdir, exist_ok=True)
    env = os.environ | {"REASONING_BASE_DIR": workdir, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.dry_run:
        env["REASONING_DEVICE"] = "cpu"
    python = [sys.executable]
    subprocess.run([*python, "-m", "reasoning.dataset", "--synthetic", "--num-shards", "3", "--docs-per-shard",
                    "300" if args.dry_run else "2000"], cwd=REPO, env=env, check=True, capture_output=True)
    subprocess.run([*python, "-m", "scripts.tok_train", "--vocab-size", "400" if args.dry_run else "4096"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    launcher = [*python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]

    rows = []
    for stage, flags in stage_commands(args.dry_run):
        output, seconds = run_stage(launcher, stage, flags, env, workdir)
        row = check_row(stage, parse_result(output), parse_plan(output), cuda, hopper)
        row["seconds"] = seconds
        rows.append(row)
    status, diff = attention_parity(2048) if cuda else ("skipped (no CUDA)", None)
    engine = None
    if args.engine and cuda:
        proc = subprocess.run([*python, "-m", "dev.bench_engine", "--device", "cuda", "--rounds", "3"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=900)
        engine = parse_result(proc.stdout)

    print(f"\n{'stage':<11} {'planned GiB':>11} {'max_mem GiB':>11} {'ratio':>6} {'fa3':>6} {'sdpa':>6} "
          f"{'s':>5}  status")
    for r in rows:
        print(f"{r['stage']:<11} {_fmt(r['planned'], '11.2f')} {_fmt(r['measured'], '11.2f')} "
              f"{_fmt(r['ratio'], '6.2f')} {r['fa3']:>6} {r['sdpa']:>6} {r['seconds']:5.0f}  "
              f"{'ok' if r['ok'] else 'CHECK'}")
    base = rows[0]["result"]
    print(f"base_train: tok/s {base.get('tok_per_s', 'na')}, MFU {base.get('mfu', 'na')}")
    print(f"FA3 vs SDPA parity (direct call): {status} {_fmt(diff, '.2e')}")
    if engine:
        print("engine: " + " ".join(f"{k}={v}" for k, v in engine.items()))
    if not args.keep:
        subprocess.run(["rm", "-rf", workdir])
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    fa3 = "na" if not cuda else ("yes" if all(r["fa3"] > 0 and r["sdpa"] == 0 for r in rows) else "no")
    print(f"RESULT stages_ok={sum(r['ok'] for r in rows)}/{len(rows)} fa3_in_model={fa3} "
          f"base_tok_s={base.get('tok_per_s', 'na')} base_mfu={base.get('mfu', 'na')} "
          f"mem_ratio_max={_fmt(max(ratios) if ratios else None, '.3f')} fa3_parity={_fmt(diff, '.2e')}")


if __name__ == "__main__":
    main()
