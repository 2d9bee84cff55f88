"""Evaluate a base checkpoint: validation bits per byte, greedy samples, and CORE if an eval bundle is present.

    python -m scripts.base_eval                                   # newest base checkpoint, last step
    python -m scripts.base_eval --init-from base:d4@500 --eval-tokens 1048576
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --tag d20

CORE (DCLM-style in-context tasks, reasoning.core_eval) runs only when the bundle exists locally
(`--eval-bundle PATH`, default <base>/eval_bundle); nothing is downloaded. Logs the report section "base_eval".
"""

import os
import time

from reasoning import memplan
from reasoning.checkpoint import add_model_args, load_model_from_args
from reasoning.common import UserError, get_base_dir, get_compute_dtype, init_distributed, print0, run_main
from reasoning.pretrain import DEFAULT_SAMPLE_PROMPTS, evaluate_val_bpb, sample_completions
from reasoning.report import log_stage
from reasoning.training import add_run_args, parse_script_args, print_result, script_parser


def build_parser():
    parser = script_parser(__doc__)
    add_model_args(parser, default_stage="base")
    parser.add_argument("--data-dir", default=None, help="parquet shards (default $REASONING_DATA_DIR or "
                                                         "<base>/base_data); the last shard is validation")
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward")
    parser.add_argument("--max-seq-len", type=int, default=None, help="row length (default: the model's context)")
    parser.add_argument("--eval-tokens", type=int, default=10 * 2**20, help="validation tokens (all ranks)")
    parser.add_argument("--sample-tokens", type=int, default=32, help="tokens per greedy sample (0: no samples)")
    parser.add_argument("--eval-bundle", default=None, help="CORE eval bundle dir (default <base>/eval_bundle)")
    parser.add_argument("--core-max-per-task", type=int, default=-1,
                        help="evaluate at most this many examples per CORE task (-1: all)")
    add_run_args(parser)
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    args = parse_script_args(parser, argv)
    for name in ("device_batch_size", "eval_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")

    start = time.perf_counter()
    info = init_distributed(args.device)
    base_dir = args.base_dir or get_base_dir()
    model, tokenizer, meta = load_model_from_args(args, device=info.device, base_dir=base_dir)
    dtype = get_compute_dtype(info.device)
    max_seq_len = args.max_seq_len or model.config.max_seq_len
    if max_seq_len < 1:
        raise UserError(f"--max-seq-len {max_seq_len}: expected a positive integer")
    memplan.check_stage(lambda: memplan.plan_base_eval(args.device_batch_size, max_seq_len, model.config), info.device,
                        "--device-batch-size")
    print0(f"checkpoint step {meta['step']}: {model.num_params():,} params, evaluating on {info.device}")

    bpb = evaluate_val_bpb(model, tokenizer, args.device_batch_size, max_seq_len, args.eval_tokens, args.data_dir,
                           info.device, dtype, info.rank, info.world_size)
    print0(f"val bpb: {bpb:.4f}")
    samples = []
    if info.rank == 0 and args.sample_tokens > 0:
        samples = sample_completions(model, tokenizer, DEFAULT_SAMPLE_PROMPTS, args.sample_tokens)
        for s in samples:
            print0(f"  {s['prompt']!r} -> {s['completion']!r}")

    metrics = {"val_bpb": bpb, "step": meta["step"]}
    tables = {"samples": samples} if samples else {}
    bundle = args.eval_bundle or os.path.join(base_dir, "eval_bundle")
    if os.path.isdir(bundle):
        from reasoning.core_eval import evaluate_core

        core = evaluate_core(model, tokenizer, bundle, device=info.device, dtype=dtype,
                             max_per_task=None if args.core_max_per_task < 0 else args.core_max_per_task,
                             rank=info.rank, world_size=info.world_size)
        metrics["core"] = core["core"]
        tables["core tasks"] = core["tasks"]
        for row in core["tasks"]:
            print0(f"  {row['task']:<32} acc {row['accuracy']:.4f}  centered {row['centered']:+.4f}")
        print0(f"CORE: {core['core']:.4f}")
    else:  # not silent: the report and the RESULT line say CORE was not measured, and why
        metrics["core"] = None
        tables["CORE"] = [{"status": "skipped", "reason": f"no eval bundle at {bundle} (pass --eval-bundle DIR)"}]
        print0(f"CORE skipped: no eval bundle at {bundle} (pass --eval-bundle DIR)")

    if info.rank == 0:
        log_stage("base_eval", config=vars(args) | {"checkpoint_step": meta["step"]}, metrics=metrics,
                  seconds=time.perf_counter() - start, tables=tables, base_dir=base_dir)
        print_result({"val_bpb": bpb, "core": metrics["core"], "step": meta["step"]})


if __name__ == "__main__":
    run_main(main)
