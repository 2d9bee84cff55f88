"""Latent reasoning (Coconut) against written reasoning and none, on the synthetic multi-step task at CPU scale.

From ONE base checkpoint, three fine-tunes through the chat_latent stage's own trainer (scripts/chat_latent.py):
  (a) no-CoT: the answer alone ("The answer is \\boxed{N}."), --nocot;
  (b) CoT: the written steps, one equation per line, then the answer (curriculum stage 0);
  (c) Coconut: (b)'s checkpoint through stages 1..K, stage k replacing the first k steps by k*c latent positions
      (K = the most steps a problem has, so the final stage writes no step at all).
No-CoT trains as many optimizer steps as (b) and (c) together, so (c) has no compute advantage over it.
Each is evaluated greedily on the same --eval-problems held-out test problems (computations disjoint from train);
generated tokens are the decoded tokens (with <assistant_end>) plus, for Coconut, its latent positions.
Prints a line per arm (accuracy ± standard error, mean generated tokens, steps, minutes) and as its last line
`RESULT nocot_acc=… cot_acc=… latent_acc=… cot_tokens=… latent_tokens=… nocot_tokens=… … seed=…`;
latent_empty_acc is a control: the Coconut model evaluated with an empty latent span (0 latent steps).

The base comes from --base-from DIR (a pipeline folder holding tokenizer/ and checkpoints/base/<tag>/, e.g. made by
dev/rl_learning.py or runs/runcpu.sh) or is built in --base-dir by the project's stages (synthetic corpus ->
tokenizer -> base_train, as dev/rl_learning.py does; ~5 min of CPU).

    OMP_NUM_THREADS=1 .venv/bin/python -m dev.latent_compare --base-from /tmp/rlclean_pipe --seed 0
    OMP_NUM_THREADS=1 .venv/bin/python -m dev.latent_compare --base-dir /tmp/latent_pipe --seed 1   # builds a base
    # arms trained apart (--arms nocot --base-dir B2): put their checkpoints in one folder, evaluate all with --reuse
    OMP_NUM_THREADS=1 .venv/bin/python -m dev.latent_compare --base-from /tmp/rlclean_pipe --base-dir B --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def build_base(base_dir: str, depth: int, steps: int, vocab_size: int) -> None:
    """Corpus, tokenizer and base_train in base_dir, as dev/rl_learning.py builds them."""
    from reasoning.dataset import iter_documents
    from reasoning.pretrain import TrainConfig
    from reasoning.tokenizer import cap_text_stream, train_tokenizer
    from scripts.base_train import train
    from tasks.synthetic import write_synthetic_corpus

    data_dir, tokenizer_dir = os.path.join(base_dir, "base_data"), os.path.join(base_dir, "tokenizer")
    write_synthetic_corpus(data_dir, num_shards=8, docs_per_shard=4000, seed=0)
    train_tokenizer(cap_text_stream(iter_documents(data_dir, split="train"), doc_cap=10_000), vocab_size) \
        .save(tokenizer_dir)
    train(TrainConfig(depth=depth, max_seq_len=256, device_batch_size=16, total_batch_size=16 * 256,
                      num_iterations=steps, eval_every=-1, sample_every=-1, log_every=50, tag=f"d{depth}",
                      device="cpu", data_dir=data_dir, base_dir=base_dir, tokenizer_dir=tokenizer_dir,
                      overwrite=True))


def evaluate(ckpt_dir: str, config, problems: int, max_tokens: int, latent_steps: int | None = None) -> dict:
    """Greedy accuracy, its standard error and mean generated tokens (latent positions included), with the
    checkpoint's latent-step count or `latent_steps`."""
    from reasoning.checkpoint import load_model
    from reasoning.eval_metrics import standard_error
    from reasoning.evaluation import EvalSettings, evaluate_task
    from reasoning.latent import with_latent_tokens
    from scripts.chat_latent import build_task

    model, tokenizer, meta = load_model(ckpt_dir, device="cpu")
    latent_steps = meta["latent"]["latent_steps"] if latent_steps is None else latent_steps
    task = build_task(config, "test", problems)
    with tempfile.TemporaryDirectory(prefix="latent_compare_eval_") as out_dir:
        evaluate_task(model, with_latent_tokens(tokenizer), task,
                      EvalSettings(max_tokens=max_tokens, batch_size=250, latent_steps=latent_steps), out_dir=out_dir)
        with open(os.path.join(out_dir, "predictions.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
    scores = [float(bool(r["correct"])) for r in records]
    tokens = [r["num_tokens"] + latent_steps for r in records]
    return {"acc": sum(scores) / len(scores), "se": standard_error(scores), "tokens": sum(tokens) / len(tokens),
            "latent_steps": latent_steps, "truncated": sum(r["stop_reason"] != "stop" for r in records)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", default=None, help="run folder (default: a fresh temp dir)")
    parser.add_argument("--base-from", default=None, help="pipeline folder with tokenizer/ and checkpoints/base/")
    parser.add_argument("--base-tag", default="d2")
    parser.add_argument("--depth", type=int, default=2, help="depth of a base built here")
    parser.add_argument("--base-steps", type=int, default=300, help="pretraining steps of a base built here")
    parser.add_argument("--seed", type=int, default=0, help="data order of every fine-tune")
    parser.add_argument("--min-steps", type=int, default=3, help="fewest operations per problem")
    parser.add_argument("--max-steps", type=int, default=4, help="most operations per problem (= stages K)")
    parser.add_argument("--max-operand", type=int, default=10)
    parser.add_argument("--cot-steps", type=int, default=300, help="optimizer steps of the CoT fine-tune")
    parser.add_argument("--steps-per-stage", type=int, default=150, help="optimizer steps of each latent stage")
    parser.add_argument("--latents-per-step", type=int, default=1, help="c")
    parser.add_argument("--rows", type=int, default=32, help="rows per optimizer step")
    parser.add_argument("--eval-problems", type=int, default=1000)
    parser.add_argument("--eval-max-tokens", type=int, default=96)
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate (not train) an arm whose finished checkpoint is already in --base-dir")
    parser.add_argument("--arms", default="cot,latent,nocot",
                        help="which fine-tunes to run (latent continues cot's checkpoint in the same --base-dir); "
                             "the others print na")
    args = parser.parse_args()

    import torch

    from reasoning import checkpoint as ckpt
    from reasoning.common import seed_everything
    from scripts.chat_latent import LatentConfig, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base_dir = args.base_dir or tempfile.mkdtemp(prefix="latent_compare_")
    os.makedirs(base_dir, exist_ok=True)
    if args.base_from is None:
        if ckpt.find_last_step(ckpt.checkpoint_dir("base", f"d{args.depth}", base_dir)) < 0:
            build_base(base_dir, args.depth, args.base_steps, 1024)
        base_ckpt = ckpt.checkpoint_dir("base", f"d{args.depth}", base_dir)
    else:
        base_ckpt = ckpt.checkpoint_dir("base", args.base_tag, args.base_from)
    print(f"[latent_compare] base {base_ckpt} | run folder {base_dir} | seed {args.seed}", flush=True)
    common = dict(task="synthetic", synthetic_min_steps=args.min_steps, synthetic_max_steps=args.max_steps,
                  synthetic_max_operand=args.max_operand, latents_per_step=args.latents_per_step,
                  device_batch_size=args.rows, total_batch_rows=args.rows, max_seq_len=256, eval_every=-1,
                  log_every=100, seed=args.seed, base_dir=base_dir, overwrite=True)
    latent_total = args.max_steps * args.steps_per_stage
    arms = {  # name: (source checkpoint, config)
        "cot": (base_ckpt, LatentConfig(**common, max_stage=0, steps_per_stage=args.cot_steps,
                                        out_tag=f"cot_s{args.seed}")),
        "latent": (None, LatentConfig(**common, start_stage=1, max_stage=args.max_steps,
                                      steps_per_stage=args.steps_per_stage, out_tag=f"latent_s{args.seed}")),
        "nocot": (base_ckpt, LatentConfig(**common, nocot=True, max_stage=0,
                                          steps_per_stage=args.cot_steps + latent_total,
                                          out_tag=f"nocot_s{args.seed}")),
    }
    wanted = args.arms.split(",")
    if not wanted or set(wanted) - set(arms):
        raise SystemExit(f"--arms {args.arms}: expected a comma list of {', '.join(arms)}")
    results = {}
    for name, (source_dir, config) in arms.items():
        if name not in wanted:
            continue
        ckpt_dir = ckpt.checkpoint_dir("latent", config.out_tag, base_dir)
        if not (args.reuse and ckpt.find_last_step(ckpt_dir) == config.num_iterations):
            source_dir = source_dir or ckpt.checkpoint_dir("latent", f"cot_s{args.seed}", base_dir)  # (c) after (b)
            seed_everything(args.seed)
            source = ckpt.ModelSource.resolve(source_dir)
            model, tokenizer, _ = source.load("cpu", phase="train")
            train(config, model, tokenizer, source)
        meta = ckpt.load_meta(ckpt_dir)
        losses = [loss for _, loss in meta["history"]["train_loss"]][-20:]
        t0 = time.perf_counter()
        results[name] = evaluate(ckpt_dir, config, args.eval_problems, args.eval_max_tokens)
        r = results[name]
        print(f"[latent_compare] {name}: acc {r['acc']:.4f} ± {r['se']:.4f} | {r['tokens']:.1f} generated tokens "
              f"({r['latent_steps']} latent) | {r['truncated']} cut at max tokens | {meta['step']} steps, "
              f"train loss {sum(losses) / len(losses):.4f} (last 20) | train {meta['train_seconds'] / 60:.2f} min, "
              f"eval {(time.perf_counter() - t0) / 60:.2f} min", flush=True)
        if name == "latent":  # control: the same model with an empty latent span (do the thoughts carry anything?)
            r = results["latent_empty"] = evaluate(ckpt_dir, config, args.eval_problems, args.eval_max_tokens,
                                                   latent_steps=0)
            print(f"[latent_compare] latent model, 0 latent steps: acc {r['acc']:.4f} ± {r['se']:.4f} | "
                  f"{r['tokens']:.1f} generated tokens", flush=True)
    def figure(arm: str, key: str, digits: int) -> str:
        return f"{results[arm][key]:.{digits}f}" if arm in results else "na"

    print(f"RESULT nocot_acc={figure('nocot', 'acc', 4)} cot_acc={figure('cot', 'acc', 4)} "
          f"latent_acc={figure('latent', 'acc', 4)} cot_tokens={figure('cot', 'tokens', 1)} "
          f"latent_tokens={figure('latent', 'tokens', 1)} nocot_tokens={figure('nocot', 'tokens', 1)} "
          f"nocot_se={figure('nocot', 'se', 4)} cot_se={figure('cot', 'se', 4)} "
          f"latent_se={figure('latent', 'se', 4)} latent_empty_acc={figure('latent_empty', 'acc', 4)} "
          f"seed={args.seed}")


if __name__ == "__main__":
    main()
