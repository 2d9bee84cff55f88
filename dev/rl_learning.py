"""The real bar for the RL stage: on the CPU pipeline's synthetic task, held-out greedy accuracy after RL must beat
the accuracy after SFT by >= 15 points, within <= 10 minutes of CPU RL.

Runs the offline pipeline from scratch in one folder (default: a fresh temp dir; --base-dir DIR keeps it and, with
--reuse, skips the stages whose outputs are already there): synthetic corpus -> tokenizer -> base_train -> SFT ->
greedy eval -> RL -> the same greedy eval, through the library functions the scripts call. The defaults are the
configuration chosen for runs/runcpu.sh (measurements and the alternatives tried: dev/LOG.md, "RL learning").
Prints one line per stage (wall and CPU minutes: the dev box is shared, so wall time is pessimistic) and as its
last line `RESULT sft_acc=<x> rl_acc=<y> rl_minutes=<z> ...`.

    OMP_NUM_THREADS=1 .venv/bin/python -m dev.rl_learning
    OMP_NUM_THREADS=1 .venv/bin/python -m dev.rl_learning --base-dir /tmp/rlpipe --reuse --rl-lr-scale 0.3
    # clean SFT data instead (no answer-only examples): the twostep preset, +18 points in ~5 CPU minutes of RL
    OMP_NUM_THREADS=1 .venv/bin/python -m dev.rl_learning --difficulty twostep --sft-steps 30 --sft-answer-only 0 \
        --rl-steps 450 --rl-lr-scale 0.1 --rl-warmup-ratio 0.05
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from reasoning import checkpoint as ckpt


class Stopwatch:
    """Wall and CPU (this process) time of a stage."""

    def __init__(self):
        self.rows = []

    def __call__(self, name: str):
        watch = self

        class _Stage:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), time.process_time()
                return self

            def __exit__(self, *exc):
                wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
                watch.rows.append((name, wall, cpu))
                print(f"[rl_learning] {name}: {wall / 60:.2f} min wall, {cpu / 60:.2f} min CPU", flush=True)
                return False
        return _Stage()


def held_out_accuracy(model, tokenizer, problems: int, max_tokens: int, difficulty: str) -> float:
    """Greedy accuracy on the first `problems` synthetic test problems: the eval used for both SFT and RL."""
    from reasoning.evaluation import EvalSettings, evaluate_task
    from tasks.synthetic import SyntheticReasoning

    task = SyntheticReasoning(split="test", size=problems, difficulty=difficulty)
    summary = evaluate_task(model, tokenizer, task, EvalSettings(max_tokens=max_tokens, batch_size=128))
    return summary["accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", default=None, help="run folder (default: a fresh temp dir)")
    parser.add_argument("--reuse", action="store_true", help="skip stages whose outputs exist in --base-dir")
    parser.add_argument("--difficulty", default="easy", help="synthetic preset for SFT, RL and eval")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-answer-only", type=float, default=0.5,
                        help="fraction of SFT examples without worked steps (see dev/LOG.md, RL on the synthetic task)")
    parser.add_argument("--eval-problems", type=int, default=500, help="synthetic test problems (the split has 500)")
    parser.add_argument("--eval-max-tokens", type=int, default=64)
    parser.add_argument("--rl-steps", type=int, default=100)
    parser.add_argument("--rl-lr-scale", type=float, default=0.2)
    parser.add_argument("--rl-warmup-ratio", type=float, default=0.0)
    parser.add_argument("--rl-prompts", type=int, default=16, help="prompts per RL step")
    parser.add_argument("--rl-samples", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--rl-temperature", type=float, default=1.0)
    parser.add_argument("--rl-loss-type", default="grpo")
    parser.add_argument("--rl-filter", action=argparse.BooleanOptionalAction, default=True,
                        help="drop zero-variance groups from the training batch")
    parser.add_argument("--rl-max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="RL seed")
    args = parser.parse_args()

    import torch

    from reasoning.common import seed_everything
    from reasoning.pretrain import TrainConfig, train
    from reasoning.rl import RLConfig, train_rl
    from reasoning.sft import SFTConfig, train_sft

    base_dir = args.base_dir or tempfile.mkdtemp(prefix="rl_learning_")
    os.makedirs(base_dir, exist_ok=True)
    print(f"[rl_learning] base dir {base_dir} | torch threads {torch.get_num_threads()}", flush=True)
    watch = Stopwatch()
    data_dir = os.path.join(base_dir, "base_data")
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    tag = f"d{args.depth}"

    def have(stage: str) -> bool:
        return args.reuse and ckpt.find_last_step(ckpt.checkpoint_dir(stage, tag, base_dir)) >= 0

    if not (args.reuse and os.path.isdir(data_dir)):
        from tasks.synthetic import write_synthetic_corpus
        with watch("corpus"):
            write_synthetic_corpus(data_dir, num_shards=8, docs_per_shard=4000, seed=0)
    if not (args.reuse and os.path.isdir(tokenizer_dir)):
        from reasoning.dataset import iter_documents
        from reasoning.tokenizer import cap_text_stream, train_tokenizer
        with watch("tokenizer"):
            docs = cap_text_stream(iter_documents(data_dir, split="train"), doc_cap=10_000)
            train_tokenizer(docs, args.vocab_size).save(tokenizer_dir)
    if not have("base"):
        with watch("base_train"):
            train(TrainConfig(depth=args.depth, max_seq_len=256, device_batch_size=16, total_batch_size=16 * 256,
                              num_iterations=args.base_steps,
                              eval_every=-1, sample_every=-1, log_every=50, tag=tag, device="cpu", data_dir=data_dir,
                              base_dir=base_dir, tokenizer_dir=tokenizer_dir, overwrite=True))

    if not have("sft"):
        with watch("sft"):
            seed_everything(0)
            model, tokenizer, meta = ckpt.load_model("base", tag, device="cpu", phase="train", base_dir=base_dir)
            source = {"dir": ckpt.checkpoint_dir("base", tag, base_dir), "step": meta["step"], "tag": tag,
                      "tokenizer_dir": meta.get("tokenizer_dir")}
            train_sft(SFTConfig(task="synthetic", synthetic_difficulty=args.difficulty, num_iterations=args.sft_steps,
                                synthetic_answer_only=args.sft_answer_only,
                                device_batch_size=16, max_seq_len=256, eval_every=-1, log_every=50,
                                base_dir=base_dir, overwrite=True), model, tokenizer, source, torch.device("cpu"))

    with watch("eval_sft"):
        model, tokenizer, _ = ckpt.load_model("sft", tag, device="cpu", base_dir=base_dir)
        sft_acc = held_out_accuracy(model, tokenizer, args.eval_problems, args.eval_max_tokens, args.difficulty)
    print(f"[rl_learning] SFT held-out accuracy {sft_acc:.4f}", flush=True)

    rl_config = RLConfig(
        stage="sft", tag=tag, task="synthetic", synthetic_difficulty=args.difficulty, num_steps=args.rl_steps,
        prompts_per_step=args.rl_prompts, num_samples=args.rl_samples, max_new_tokens=args.rl_max_new_tokens,
        temperature=args.rl_temperature, loss_type=args.rl_loss_type, filter_zero_variance=args.rl_filter,
        lr_scale=args.rl_lr_scale, warmup_ratio=args.rl_warmup_ratio, eval_every=50, eval_problems=100,
        eval_pass_k=0, log_every=25, out_tag=tag, seed=args.seed, device="cpu", base_dir=base_dir,
        overwrite=True)  # every invocation retrains RL into the same tag
    with watch("rl"):
        summary = train_rl(rl_config)
    rl_minutes = watch.rows[-1][1] / 60
    rl_cpu_minutes = watch.rows[-1][2] / 60

    with watch("eval_rl"):
        model, tokenizer, _ = ckpt.load_model("rl", tag, device="cpu", base_dir=base_dir)
        rl_acc = held_out_accuracy(model, tokenizer, args.eval_problems, args.eval_max_tokens, args.difficulty)

    print("\n| stage | wall min | CPU min |\n|---|---|---|")
    for name, wall, cpu in watch.rows:
        print(f"| {name} | {wall / 60:.2f} | {cpu / 60:.2f} |")
    print(f"\nSFT {sft_acc:.4f} -> RL {rl_acc:.4f} ({(rl_acc - sft_acc) * 100:+.1f} points) | RL reward "
          f"{summary['metrics']['initial_reward']:.3f} -> {summary['metrics']['mean_reward']:.3f} over "
          f"{summary['step']} steps")
    print(f"RESULT sft_acc={sft_acc:.4f} rl_acc={rl_acc:.4f} rl_minutes={rl_minutes:.2f} "
          f"rl_cpu_minutes={rl_cpu_minutes:.2f} gain={rl_acc - sft_acc:.4f}", flush=True)


if __name__ == "__main__":
    from reasoning.common import run_main

    run_main(main)
