"""Validate the memory planner on CPU: predicted peak (fake tensors) vs measured peak (real tensors, CPU allocator).

For small configurations of every stage, the same plan function (reasoning.memplan) runs twice with target "cpu":
on fake tensors (the prediction) and on real tensors under torch.profiler(profile_memory=True), whose allocator
events give the measured peak of live tensor bytes. Only the CPU fp32 path is measured here: what the planner says
about a GPU (bf16 autocast policy, FA3) is the planner's model, not a measurement.

    python -m dev.plan_validate            # prints the table, ends with RESULT max_err=<x> configs=<n>
"""

from __future__ import annotations

import argparse
import statistics

import torch

from reasoning import memplan
from reasoning.gpt import config_from_depth
from reasoning.pretrain import TrainConfig
from reasoning.pretrain import plan_memory as pretrain_plan
from reasoning.rl import RLConfig
from reasoning.rl import plan_memory as rl_plan
from reasoning.sft import SFTConfig
from reasoning.sft import plan_memory as sft_plan
from reasoning.training import print_result


def _stage_cases():
    """(name, plan function(fake) -> [PhasePlan]) for 3+ small configurations per stage."""
    cases = []
    for depth, vocab, B, T in ((2, 512, 4, 64), (3, 1024, 8, 128), (4, 2048, 4, 256)):
        mc = config_from_depth(depth, vocab, max_seq_len=T)
        cfg = TrainConfig(depth=depth, device_batch_size=B, max_seq_len=T)
        cases.append((f"base_train d{depth} V{vocab} {B}x{T}",
                      lambda fake, cfg=cfg, mc=mc: pretrain_plan(cfg, mc, target="cpu", fake=fake)))
    for depth, vocab, B, T, acc in ((2, 512, 4, 64, 1), (3, 1024, 4, 128, 2), (4, 2048, 2, 256, 1)):
        mc = config_from_depth(depth, vocab, max_seq_len=T)
        cfg = SFTConfig(device_batch_size=B, max_seq_len=T, total_batch_rows=B * acc, eval_every=-1)
        cases.append((f"chat_sft d{depth} V{vocab} {B}x{T} acc{acc}",
                      lambda fake, cfg=cfg, mc=mc: sft_plan(cfg, mc, target="cpu", fake=fake)))
    for depth, vocab, P, G, new, rows in ((2, 512, 2, 4, 32, 4), (3, 1024, 4, 4, 64, 8), (4, 2048, 2, 8, 96, 8)):
        mc = config_from_depth(depth, vocab, max_seq_len=256)
        cfg = RLConfig(prompts_per_step=P, num_samples=G, max_new_tokens=new, device_batch_size=rows,
                       logprob_chunk_size=64, eval_every=-1)
        cases.append((f"chat_rl d{depth} V{vocab} {P}x{G} new{new} rows{rows}",
                      lambda fake, cfg=cfg, mc=mc: rl_plan(cfg, mc, target="cpu", fake=fake,
                                                                   prompt_tokens=24)))
    for depth, vocab, B, k, new in ((2, 512, 4, 1, 32), (3, 1024, 4, 4, 64), (4, 2048, 8, 2, 96)):
        mc = config_from_depth(depth, vocab, max_seq_len=256)
        cases.append((f"chat_eval d{depth} V{vocab} {B}x{k} new{new}",
                      lambda fake, B=B, k=k, new=new, mc=mc: memplan.plan_chat_eval(B, k, new, mc, target="cpu",
                                                                                   fake=fake, prompt_tokens=24)))
    return cases


def validate(names: list[str] | None = None) -> list[dict]:
    rows = []
    for name, plan in _stage_cases():
        if names and not any(name.startswith(n) for n in names):
            continue
        predicted = max(p.total for p in plan(True))
        measured = memplan.measure_cpu_peak(lambda: plan(False))
        rows.append({"config": name, "predicted": predicted, "measured": measured,
                     "error": predicted / measured - 1})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", action="append", help="only configurations of this stage (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = validate(args.stage)
    print("| configuration | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['predicted'] / 2**20:.2f} | {r['measured'] / 2**20:.2f} | {r['error']:+.1%} |")
    errors = [abs(r["error"]) for r in rows]
    print_result({"max_err": round(max(errors), 3), "median_err": round(statistics.median(errors), 3),
                  "configs": len(rows)})


if __name__ == "__main__":
    main()
