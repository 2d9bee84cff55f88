"""Supervised fine-tuning of a checkpoint on chat conversations (loop: reasoning.sft); writes <base>/checkpoints/sft/.

    # CPU / offline (runs/runcpu.sh): the synthetic task, worked steps in the think span, \\boxed{} answer
    python -m scripts.chat_sft --task synthetic --num-iterations 300 --device-batch-size 16 --max-seq-len 256
    # GPUs: the default reasoning mixture (hub, or local files with --data-path DIR)
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- \\
        --task "GSM8K*2,MATH,SmolTalk" --max-seq-len 2048 --device-batch-size 16 --total-batch-rows 256 \\
        --eval-task GSM8K --run sft_d20
    python -m scripts.chat_sft ... --resume          # continue from the last checkpoint of the output tag

The source model comes from --stage/--tag/--step/--init-from (default: the newest base checkpoint); the output tag
defaults to the source's tag (--out-tag overrides). Every other flag is a field of reasoning.sft.SFTConfig.
Metrics go to <base>/logs/sft_<tag>.jsonl (and wandb with --run NAME); on success the report gets a "chat_sft"
section (train/val loss, accuracy on the held-out eval slice, loss curves). Exit code 3 when the loss diverges.
"""

from reasoning.checkpoint import add_model_args, load_model_from_args
from reasoning.common import init_distributed, run_main, seed_everything
from reasoning.evaluation import resolve_source
from reasoning.sft import add_sft_args, config_from_args, train_sft
from reasoning.training import add_run_args, finish_training_script, parse_script_args, run_trainer, script_parser
from tasks.registry import build_sft_tasks


def build_parser():
    parser = script_parser(__doc__)
    add_model_args(parser, default_stage="base")
    add_sft_args(parser)
    add_run_args(parser, base_dir=False)  # --base-dir is an SFTConfig field
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    args = parse_script_args(parser, argv)
    config = config_from_args(args)
    config.validate()

    info = init_distributed(args.device)
    seed_everything(config.seed)
    source = resolve_source(args, config.base_dir)
    model, tokenizer, meta = load_model_from_args(args, info.device, phase="train", base_dir=config.base_dir)
    source["tokenizer_dir"] = meta.get("tokenizer_dir")
    summary = run_trainer(train_sft, config, model, tokenizer, source, info.device, info.rank, info.world_size,
                          tasks=build_sft_tasks(config))
    m = summary["metrics"]
    finish_training_script(
        "chat_sft", summary, {k: m[k] for k in ("train_loss", "val_loss", "accuracy")} | {"steps": summary["step"]},
        config=summary["config"] | {"source": {k: source[k] for k in ("dir", "step")},
                                    "world_size": summary["world_size"]},
        metrics=m, base_dir=config.base_dir)


if __name__ == "__main__":
    run_main(main)
