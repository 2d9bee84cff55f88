"""RL with verifiable rewards (GRPO / Dr. GRPO / DAPO) on an SFT checkpoint (loop: reasoning.rl); writes
<base>/checkpoints/rl/<tag>/.

    # CPU / offline (runs/runcpu.sh): synthetic arithmetic prompts, 8 samples each
    python -m scripts.chat_rl --task synthetic --num-steps 60 --prompts-per-step 16 --num-samples 8
    # GPUs: GSM8K prompts, DAPO-style token loss with clip-higher and overlong shaping
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --task GSM8K --data-path ../shared/data \\
        --prompts-per-step 128 --num-samples 16 --max-new-tokens 1024 --loss-type dapo --clip-high 0.28 \\
        --filter-zero-variance --overlong-buffer 256 --num-minibatches 4 --run rl_d20
    python -m scripts.chat_rl ... --resume      # continue from the last checkpoint of the output tag

The source model comes from --stage/--tag/--step/--init-from (default: the newest sft checkpoint); the output tag
defaults to the source's tag (--out-tag overrides). Every other flag is a field of reasoning.rl.RLConfig.
Metrics go to <base>/logs/chat_rl_<tag>.jsonl (and wandb with --run NAME); on success the report gets a "chat_rl"
section (initial/final held-out accuracy, mean reward, reward and accuracy curves). Exit code 3 on divergence.
"""

import argparse
import sys

from reasoning.checkpoint import add_model_args
from reasoning.common import die, is_master, run_main, seed_everything
from reasoning.pretrain import NonFiniteLossError
from reasoning.report import log_stage
from reasoning.rl import add_rl_args, config_from_args, train_rl


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # torchrun passes the separator through
        argv = argv[1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, default_stage="sft")
    add_rl_args(parser)
    config = config_from_args(parser.parse_args(argv))
    config.validate()
    seed_everything(config.seed)
    try:
        summary = train_rl(config)
    except NonFiniteLossError as e:
        die(str(e), code=3)
    m = summary["metrics"]
    if is_master() and summary["finished"]:
        log_stage("chat_rl", config=summary["config"] | {"source": summary["source"],
                                                         "world_size": summary["world_size"]},
                  metrics=m, series={k: v for k, v in summary["series"].items() if v}, seconds=summary["seconds"],
                  base_dir=config.base_dir)

    def fmt(value):
        return "nan" if value is None else f"{value:.4f}"

    status = "" if summary["finished"] else f" stopped_at={summary['step']}"
    if is_master():
        print(f"RESULT initial_accuracy={fmt(m['initial_accuracy'])} accuracy={fmt(m['accuracy'])} "
              f"mean_reward={fmt(m['mean_reward'])} steps={summary['step']}{status}", flush=True)


if __name__ == "__main__":
    run_main(main)
