"""The real bar for the RL stage: on the CPU pipeline's synthetic task, starting from an SFT model trained on clean
data (every example fully worked), held-out greedy accuracy after RL must beat the accuracy after SFT by >= 15
points and >= 5 standard errors, within <= 10 minutes of CPU RL -- and a negative control must not.

Runs the offline pipeline from scratch in one folder (default: a fresh temp dir; --base-dir DIR keeps it and, with
--reuse, skips the corpus/tokenizer/base/SFT stages whose outputs are already there): synthetic corpus -> tokenizer
-> base_train -> SFT -> greedy eval -> RL -> the same greedy eval, then the control (the same RL run with the
learning rate 0, or with the advantages shuffled across the step's rows) -> the same eval, through the library
functions the scripts call. With --reuse a finished RL run of the same seed (and control) is reused too (its
rl_minutes then come from its checkpoint, rl_cpu_minutes=na). The defaults are runs/runcpu.sh's "clean" recipe
(dev/LOG.md: "RL loop ... the RL sweep" and "runcpu's RL gain from clean SFT data").

Accuracies are greedy on the first --eval-problems (1000) test problems, each with its standard error over problems;
`se` is the standard error of the gain (sqrt(se_sft^2 + se_rl^2): conservative, the pairing is ignored), and
`se_cluster` the same gain's standard error when problems that share a computation count as one cluster (the
twostep test split has 48 distinct computations behind its first 1000 problems). Prints one line per stage (wall and CPU
minutes: the dev box is shared, so wall time is pessimistic) and as its last line
`RESULT sft_acc=<x> rl_acc=<y> gain=<g> se=<s> ctrl_gain=<c> rl_minutes=<m> ...`.

    OMP_NUM_THREADS=1 .venv/bin/python -m dev.rl_learning                       # clean recipe, lr-0 control
    OMP_NUM_THREADS=1 .venv/bin/python -m dev.rl_learning --base-dir /tmp/rlpipe --reuse --seed 1
    # the answer-only mixture instead (RL teaches the model to use its think span again: dev/LOG.md)
    OMP_NUM_THREADS=1 .venv/bin/python -m dev.rl_learning --difficulty easy --sft-steps 300 --sft-answer-only 0.5 \
        --rl-steps 100 --rl-lr-scale 0.2 --rl-warmup-ratio 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

from reasoning import checkpoint as ckpt
from reasoning.common import UserError


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


CONTROLS = ("shuffle", "lr0", "none")


def held_out_scores(model, tokenizer, problems: int, max_tokens: int, difficulty: str) -> list[float]:
    """Per-problem greedy scores (0/1) on the first `problems` synthetic test problems: the eval used for SFT, RL and
    the control alike."""
    from reasoning.evaluation import EvalSettings, evaluate_task
    from tasks.synthetic import SyntheticReasoning

    task = SyntheticReasoning(split="test", size=problems, difficulty=difficulty)
    with tempfile.TemporaryDirectory(prefix="rl_learning_eval_") as out_dir:
        evaluate_task(model, tokenizer, task, EvalSettings(max_tokens=max_tokens, batch_size=128), out_dir=out_dir)
        with open(os.path.join(out_dir, "predictions.jsonl"), encoding="utf-8") as f:
            records = sorted((json.loads(line) for line in f), key=lambda r: r["index"])
    return [float(bool(r["correct"])) for r in records]


def computation_clusters(problems: int, difficulty: str) -> list[str]:
    """The computation (tasks.synthetic.computation_key) behind each test problem: its cluster for se_cluster."""
    from tasks.synthetic import SyntheticReasoning, computation_key

    task = SyntheticReasoning(split="test", size=problems, difficulty=difficulty)
    keys = []
    for i in range(problems):
        think = next(part["text"] for part in task.get_example(i)["messages"][1]["content"] if part["type"] == "think")
        keys.append(computation_key(think.split("\n")))
    return keys


def gain_se(after: list[float], before: list[float]) -> float:
    """Standard error of mean(after) - mean(before) as if the two evals were independent (>= the paired SE when
    the per-problem scores correlate positively, as they do here)."""
    from reasoning.eval_metrics import standard_error

    return math.hypot(standard_error(after), standard_error(before))


def clustered_gain_se(after: list[float], before: list[float], clusters: list[str]) -> float:
    """Cluster-robust standard error of the mean per-problem difference (problems of one computation are not
    independent: a model that has learned 2 - 2 + 4 gets all its phrasings right)."""
    diffs = [a - b for a, b in zip(after, before)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sums: dict[str, float] = {}
    for key, d in zip(clusters, diffs):
        sums[key] = sums.get(key, 0.0) + d - mean
    c = len(sums)
    return math.sqrt(sum(v * v for v in sums.values()) * c / max(c - 1, 1)) / n


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", default=None, help="run folder (default: a fresh temp dir)")
    parser.add_argument("--reuse", action="store_true", help="skip stages whose outputs exist in --base-dir")
    parser.add_argument("--difficulty", default="twostep", help="synthetic preset for SFT, RL and eval")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--sft-answer-only", type=float, default=0.0,
                        help="fraction of SFT examples without worked steps (see dev/LOG.md, RL on the synthetic task)")
    parser.add_argument("--eval-problems", type=int, default=1000, help="synthetic test problems per eval")
    parser.add_argument("--eval-max-tokens", type=int, default=64)
    parser.add_argument("--rl-steps", type=int, default=450)
    parser.add_argument("--rl-lr-scale", type=float, default=0.1)
    parser.add_argument("--rl-warmup-ratio", type=float, default=0.05)
    parser.add_argument("--rl-prompts", type=int, default=16, help="prompts per RL step")
    parser.add_argument("--rl-samples", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--rl-temperature", type=float, default=1.0)
    parser.add_argument("--rl-loss-type", default="grpo")
    parser.add_argument("--rl-filter", action=argparse.BooleanOptionalAction, default=True,
                        help="drop zero-variance groups from the training batch")
    parser.add_argument("--rl-max-new-tokens", type=int, default=64)
    parser.add_argument("--control", default="lr0", choices=CONTROLS,
                        help="negative control: the same RL run with learning rate 0 (lr0: checks that the SFT and "
                             "RL measurements agree when nothing is learned) or with advantages shuffled across the "
                             "step's rows (shuffle: the same updates without the reward's direction; they wreck the "
                             "model, dev/LOG.md); none skips it (ctrl_gain=na)")
    parser.add_argument("--seed", type=int, default=0, help="RL seed (the control uses the same one)")
    args = parser.parse_args()
    if args.eval_problems < 2:
        raise UserError(f"--eval-problems {args.eval_problems}: expected >= 2 (a standard error needs two problems)")

    import torch

    from reasoning.common import seed_everything
    from reasoning.eval_metrics import standard_error
    from reasoning.pretrain import TrainConfig
    from reasoning.sft import SFTConfig
    from scripts.base_train import train
    from scripts.chat_rl import RLConfig
    from scripts.chat_rl import train as train_rl
    from scripts.chat_sft import train as train_sft

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
            source = ckpt.ModelSource.resolve("base", tag, base_dir=base_dir)
            model, tokenizer, _ = source.load("cpu", phase="train")
            train_sft(SFTConfig(task="synthetic", synthetic_difficulty=args.difficulty, num_iterations=args.sft_steps,
                                synthetic_answer_only=args.sft_answer_only,
                                device_batch_size=16, total_batch_rows=16, max_seq_len=256, eval_every=-1, log_every=50,
                                base_dir=base_dir, overwrite=True), model, tokenizer, source)

    def evaluate(stage: str, out_tag: str) -> list[float]:
        model, tokenizer, _ = ckpt.load_model(stage, out_tag, device="cpu", base_dir=base_dir)
        return held_out_scores(model, tokenizer, args.eval_problems, args.eval_max_tokens, args.difficulty)

    with watch("eval_sft"):
        sft_scores = evaluate("sft", tag)
    print(f"[rl_learning] SFT held-out accuracy {mean(sft_scores):.4f} ± {standard_error(sft_scores):.4f} (SE, "
          f"{len(sft_scores)} problems)", flush=True)

    def finished_rl(out_tag: str) -> dict | None:
        """--reuse: the metrics of a finished RL run of this tag (its last checkpoint is at --rl-steps), else None."""
        ckpt_dir = ckpt.checkpoint_dir("rl", out_tag, base_dir)
        step = ckpt.find_last_step(ckpt_dir)
        if not args.reuse or step != args.rl_steps:
            return None
        meta = ckpt.load_checkpoint(ckpt_dir, step)[2]
        values = [v for _, v in meta["history"]["reward"]]
        return {"step": step, "metrics": {"initial_reward": mean(values[:10]), "mean_reward": mean(values[-10:])},
                "seconds": meta.get("train_seconds"), "reused": True}

    def run_rl(out_tag: str, **overrides) -> dict:
        done = finished_rl(out_tag)
        if done is not None:
            print(f"[rl_learning] reusing the finished RL run {out_tag}", flush=True)
            return done
        config = RLConfig(
            task="synthetic", synthetic_difficulty=args.difficulty, num_steps=args.rl_steps,
            prompts_per_step=args.rl_prompts, num_samples=args.rl_samples, max_new_tokens=args.rl_max_new_tokens,
            temperature=args.rl_temperature, loss_type=args.rl_loss_type, filter_zero_variance=args.rl_filter,
            lr_scale=args.rl_lr_scale, warmup_ratio=args.rl_warmup_ratio, eval_every=50, eval_problems=100,
            eval_pass_k=0, log_every=25, out_tag=out_tag, seed=args.seed, device="cpu", base_dir=base_dir,
            overwrite=True)  # without --reuse a run retrains into its tag
        for key, value in overrides.items():
            setattr(config, key, value)
        return train_rl(config, ckpt.ModelSource.resolve("sft", tag, base_dir=base_dir))

    rl_tag = f"{tag}_seed{args.seed}"  # one RL run per seed (and control), so --reuse can skip a finished one
    with watch("rl"):
        summary = run_rl(rl_tag)
    if summary.get("reused"):
        rl_minutes = f"{summary['seconds'] / 60:.2f}" if summary.get("seconds") else "na"
        rl_cpu_minutes = "na"
    else:
        rl_minutes, rl_cpu_minutes = f"{watch.rows[-1][1] / 60:.2f}", f"{watch.rows[-1][2] / 60:.2f}"
    with watch("eval_rl"):
        rl_scores = evaluate("rl", rl_tag)

    ctrl_scores = None
    if args.control != "none":
        control_tag = f"{rl_tag}_{args.control}"
        overrides = {"shuffle_advantages": True} if args.control == "shuffle" else {"lr_scale": 0.0}
        with watch(f"rl_control_{args.control}"):
            control_summary = run_rl(control_tag, **overrides)
        with watch("eval_control"):
            ctrl_scores = evaluate("rl", control_tag)

    print("\n| stage | wall min | CPU min |\n|---|---|---|")
    for name, wall, cpu in watch.rows:
        print(f"| {name} | {wall / 60:.2f} | {cpu / 60:.2f} |")
    sft_acc, rl_acc = mean(sft_scores), mean(rl_scores)
    gain, se = rl_acc - sft_acc, gain_se(rl_scores, sft_scores)
    clusters = computation_clusters(args.eval_problems, args.difficulty)
    se_cluster = clustered_gain_se(rl_scores, sft_scores, clusters)
    m = summary["metrics"]
    print(f"\n{len(sft_scores)} held-out problems ({len(set(clusters))} distinct computations), greedy:")
    print(f"SFT {sft_acc:.4f} ± {standard_error(sft_scores):.4f} -> RL {rl_acc:.4f} ± {standard_error(rl_scores):.4f}"
          f" | gain {gain * 100:+.1f} points ± {se * 100:.1f} (SE; {gain / se:.1f} SE; clustered by computation "
          f"± {se_cluster * 100:.1f}) | RL reward {m['initial_reward']:.3f} -> {m['mean_reward']:.3f} over "
          f"{summary['step']} steps")
    fields = {"sft_acc": f"{sft_acc:.4f}", "rl_acc": f"{rl_acc:.4f}", "gain": f"{gain:.4f}", "se": f"{se:.4f}",
              "ctrl_gain": "na", "rl_minutes": rl_minutes, "ctrl_se": "na",
              "se_cluster": f"{se_cluster:.4f}", "rl_cpu_minutes": rl_cpu_minutes,
              "eval_problems": str(len(sft_scores)), "control": args.control}
    if ctrl_scores is not None:
        ctrl_gain, ctrl_se = mean(ctrl_scores) - sft_acc, gain_se(ctrl_scores, sft_scores)
        within = abs(ctrl_gain) <= 2 * ctrl_se
        cm = control_summary["metrics"]
        print(f"control ({args.control}): SFT {sft_acc:.4f} -> {mean(ctrl_scores):.4f} | gain {ctrl_gain * 100:+.1f} "
              f"points ± {ctrl_se * 100:.1f} (SE): {'within' if within else 'OUTSIDE'} ±2 SE of zero | reward "
              f"{cm['initial_reward']:.3f} -> {cm['mean_reward']:.3f}")
        fields.update(ctrl_gain=f"{ctrl_gain:.4f}", ctrl_se=f"{ctrl_se:.4f}")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


if __name__ == "__main__":
    from reasoning.common import run_main

    run_main(main)
