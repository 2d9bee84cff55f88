"""The memory plan of every GPU stage of runs/speedrun.sh (its dry run's exact commands), or of the README's Qwen3
commands, per rank, without a GPU (reasoning.memplan on fake tensors; a plan, not a measurement).

    python -m dev.plan_speedrun                          # speedrun depth 20 and 26 on 80 GiB
    python -m dev.plan_speedrun --depth 20 --gpu-memory-gib 141
    python -m dev.plan_speedrun --readme-qwen            # README's Qwen3-0.6B/1.7B commands on 80 and 141 GiB

Speedrun mode ends with `RESULT fits_80gb=<stages that fit>/<stages> worst_stage=<name> worst_gib=<x>` (the key
names the GPU size); a stage fits when every phase fits with the planner's 10% headroom.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess

from reasoning import memplan
from reasoning.cli import print_result
from scripts.plan_memory import plan_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_COMMAND = re.compile(r"-m scripts\.(base_train|base_eval|chat_sft|chat_rl|chat_eval) -- (.*)$")
# The README's "Starting from Qwen3 / Llama" commands (nproc, stage, flags); --init-from is replaced by --model.
README_QWEN = (
    (1, "chat_eval", "-a MATH-500 --max-tokens 4096 --batch-size 64"),
    (8, "chat_eval", "-a MATH-500 --max-tokens 4096 --num-samples 8 --temperature 0.6"),
    (8, "chat_rl", "--task GSM8K --prompts-per-step 64 --num-samples 8 --max-new-tokens 2048 --loss-type dapo "
                   "--clip-high 0.28 --filter-zero-variance --lr-scale 0.1 --eval-task MATH-500 --eval-max-tokens 4096"),
    # the same with the micro-batch of 32 rows that was chat_rl's fixed default before the planner chose it
    (8, "chat_rl", "--task GSM8K --prompts-per-step 64 --num-samples 8 --max-new-tokens 2048 --loss-type dapo "
                   "--clip-high 0.28 --filter-zero-variance --lr-scale 0.1 --eval-task MATH-500 --eval-max-tokens 4096 "
                   "--device-batch-size 32"),
    (1, "chat_eval", "--stage rl -a MATH-500 --max-tokens 4096"),
)


def speedrun_commands(depth: int, nproc: int) -> list[tuple[str, str]]:
    """(stage, flags) of every GPU stage in `bash runs/speedrun.sh --dry-run` order."""
    env = os.environ | {"DEPTH": str(depth), "NPROC": str(nproc), "REASONING_BASE_DIR": "/nonexistent/plan"}
    out = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout
    return [m.groups() for line in out.splitlines() if (m := STAGE_COMMAND.search(line))]


def plan_rows(jobs, gpu_gib: float, prompt_tokens: int, earlier: list[dict] | None = None) -> list[dict]:
    """Plan every job for a GPU of gpu_gib; a job whose plan does not depend on the GPU size (no automatic device
    batch size) reuses its plan from `earlier` (the same jobs planned for another size)."""
    rows = []
    for i, (label, nproc, model, stage, flags) in enumerate(jobs):
        auto = stage in ("base_train", "chat_sft", "chat_rl") and "--device-batch-size" not in flags
        if earlier is not None and not auto:
            plans = earlier[i]["plans"]
        else:
            plans = plan_stage(stage, flags.split(), model, nproc, "cuda", prompt_tokens, gpu_gib)
        worst = max(plans, key=lambda p: p.total)
        rows.append({"label": label, "stage": stage, "plans": plans, "worst": worst,
                     "fits": all(p.fits(gpu_gib) for p in plans)})
    return rows


def print_rows(rows, gpu_gib: float) -> None:
    print(f"\n### per rank, {gpu_gib:g} GiB, {memplan.DEFAULT_HEADROOM:.0%} headroom (GiB)\n")
    head = ["command", "phase", "settings", *memplan.CATEGORIES, "total", "fits"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        for p in r["plans"]:
            settings = " ".join(f"{k}={v}" for k, v in p.settings.items())
            cells = [r["label"], p.phase, settings] + [f"{p.breakdown[k] / memplan.GIB:.2f}"
                                                       for k in memplan.CATEGORIES]
            cells += [f"{p.total / memplan.GIB:.2f}", "yes" if p.fits(gpu_gib) else "NO"]
            print("| " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, action="append", help="speedrun DEPTH (repeatable; default 20 and 26)")
    parser.add_argument("--nproc", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, action="append", help="default 80 (--readme-qwen: 80, 141)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--readme-qwen", action="store_true", help="the README's Qwen3 commands instead")
    args = parser.parse_args(argv)
    if args.readme_qwen:
        jobs = [(f"{model} {stage} x{nproc} {flags}", nproc, model, stage, flags)
                for model in ("qwen3-0.6b", "qwen3-1.7b") for nproc, stage, flags in README_QWEN]
        gpus = args.gpu_memory_gib or [80.0, 141.0]
    else:
        jobs = [(f"d{depth} {stage} {flags}", args.nproc, f"d{depth}", stage, flags)
                for depth in (args.depth or [20, 26]) for stage, flags in speedrun_commands(depth, args.nproc)]
        gpus = args.gpu_memory_gib or [80.0]
    results = {}
    for gpu in gpus:
        rows = plan_rows(jobs, gpu, args.prompt_tokens, results[gpus[0]] if results else None)
        print_rows(rows, gpu)
        results[gpu] = rows
    rows = results[gpus[0]]
    worst = max(rows, key=lambda r: r["worst"].total)
    print_result({f"fits_{gpus[0]:g}gb": f"{sum(r['fits'] for r in rows)}/{len(rows)}",
                  "worst_stage": worst["label"].split(" -")[0].replace(" ", "/"),
                  "worst_gib": round(worst["worst"].total / memplan.GIB, 2)})


if __name__ == "__main__":
    main()
