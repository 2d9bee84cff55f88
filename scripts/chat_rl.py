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

from reasoning.checkpoint import add_model_args
from reasoning.common import init_distributed, run_main, seed_everything
from reasoning.rl import add_rl_args, config_from_args, train_rl
from reasoning.training import finish_training_script, parse_script_args, run_trainer, script_parser
from tasks.registry import build_rl_tasks


def build_parser():
    parser = script_parser(__doc__)
    add_model_args(parser, default_stage="sft")
    add_rl_args(parser)
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    config = config_from_args(parse_script_args(parser, argv))
    config.validate()
    seed_everything(config.seed)
    init_distributed(config.device)  # before the tasks: their hub downloads go node leader first
    summary = run_trainer(train_rl, config, build_rl_tasks(config))
    m = summary["metrics"]
    finish_training_script(
        "chat_rl", summary,
        {k: m[k] for k in ("initial_accuracy", "accuracy", "mean_reward")} | {"steps": summary["step"]},
        config=summary["config"] | {"source": summary["source"], "world_size": summary["world_size"]},
        metrics=m, base_dir=config.base_dir)


if __name__ == "__main__":
    run_main(main)
