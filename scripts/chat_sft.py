"""Supervised fine-tuning of a checkpoint on chat conversations (loop: reasoning.sft); writes <base>/checkpoints/sft/.

    # CPU / offline (runs/runcpu.sh): the synthetic task, worked steps in the think span, \\boxed{} answer
    python -m scripts.chat_sft --task synthetic --num-iterations 300 --device-batch-size 16 --max-seq-len 256
    # GPUs: the default reasoning mixture (hub, or local files with --data-path DIR)
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- \\
        --task "GSM8K*2,MATH,SmolTalk" --max-seq-len 2048 --device-batch-size 16 --total-batch-size 256 \\
        --eval-task GSM8K --run sft_d20
    python -m scripts.chat_sft ... --resume          # continue from the last checkpoint of the output tag

The source model comes from --stage/--tag/--step/--init-from (default: the newest base checkpoint); the output tag
defaults to the source's tag (--out-tag overrides). Every other flag is a field of reasoning.sft.SFTConfig.
Metrics go to <base>/logs/sft_<tag>.jsonl (and wandb with --run NAME); on success the report gets a "chat_sft"
section (train/val loss, accuracy on the held-out eval slice, loss curves). Exit code 3 when the loss diverges.
"""

import argparse
import sys

from reasoning.checkpoint import add_model_args, load_model_from_args
from reasoning.common import die, init_distributed, is_master, run_main, seed_everything
from reasoning.evaluation import resolve_source
from reasoning.pretrain import NonFiniteLossError
from reasoning.report import log_stage
from reasoning.sft import add_sft_args, config_from_args, train_sft


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # torchrun passes the separator through
        argv = argv[1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, default_stage="base")
    add_sft_args(parser)
    parser.add_argument("--device", default=None, help="cuda | cpu | mps (default: autodetect)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    config.validate()

    info = init_distributed(args.device)
    seed_everything(config.seed)
    source = resolve_source(args, config.base_dir)
    model, tokenizer, meta = load_model_from_args(args, info.device, phase="train", base_dir=config.base_dir)
    source["tokenizer_dir"] = meta.get("tokenizer_dir")
    try:
        summary = train_sft(config, model, tokenizer, source, info.device, info.rank, info.world_size)
    except NonFiniteLossError as e:
        die(str(e), code=3)
    m = summary["metrics"]
    if is_master() and summary["finished"]:
        log_stage("chat_sft", config=summary["config"] | {"source": {k: source[k] for k in ("dir", "step")},
                                                          "world_size": summary["world_size"]},
                  metrics=m, series={k: v for k, v in summary["series"].items() if v}, seconds=summary["seconds"],
                  base_dir=config.base_dir)

    def fmt(value):
        return "nan" if value is None else f"{value:.4f}"

    status = "" if summary["finished"] else f" stopped_at={summary['step']}"
    if is_master():
        print(f"RESULT train_loss={fmt(m['train_loss'])} val_loss={fmt(m['val_loss'])} "
              f"accuracy={fmt(m['accuracy'])} steps={summary['step']}{status}", flush=True)


if __name__ == "__main__":
    run_main(main)
