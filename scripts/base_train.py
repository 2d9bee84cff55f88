"""Pretrain the base model on the parquet shards (loop: reasoning.pretrain); checkpoints to <base>/checkpoints/base/.

    python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 --num-iterations 500
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20 --run d20
    python -m scripts.base_train --depth 4 ... --resume          # continue from the last checkpoint of the tag

Every flag is a field of reasoning.pretrain.TrainConfig. Metrics go to <base>/logs/base_<tag>.jsonl (and wandb with
--run NAME); on success the report gets a "base_train" section. Exit code 3 when the loss stops being finite.
"""

from reasoning.common import run_main
from reasoning.pretrain import add_train_args, config_from_args, train
from reasoning.training import finish_training_script, format_metric, parse_script_args, run_trainer, script_parser


def build_parser():
    parser = script_parser(__doc__)
    add_train_args(parser)
    return parser


def main(argv: list[str] | None = None):
    parser = build_parser()
    config = config_from_args(parse_script_args(parser, argv))
    summary = run_trainer(train, config)
    m = summary["metrics"]
    finish_training_script(
        "base_train", summary, {"val_bpb": m["val_bpb"], "steps": summary["step"],
                                "tok_per_s": format_metric(m["tok_per_s"], ".0f"), "mfu": m["mfu"]},
        config=summary["config"] | {"model": summary["model_config"]},
        # a metric that was not measured (no eval with --eval-every -1) is left out of the report, not invented
        metrics={k: m[k] for k in ("initial_val_bpb", "val_bpb", "min_val_bpb", "train_loss", "tok_per_s", "mfu",
                                   "pack_utilization", "params") if m[k] is not None},
        base_dir=config.base_dir, tables={"samples": summary["samples"]} if summary["samples"] else None)


if __name__ == "__main__":
    run_main(main)
