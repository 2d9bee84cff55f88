"""Pretrain the base model on the parquet shards (loop: reasoning.pretrain); checkpoints to <base>/checkpoints/base/.

    python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 --num-iterations 500
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20 --run d20
    python -m scripts.base_train --depth 4 ... --resume          # continue from the last checkpoint of the tag

Every flag is a field of reasoning.pretrain.TrainConfig. Metrics go to <base>/logs/base_<tag>.jsonl (and wandb with
--run NAME); on success the report gets a "base_train" section. Exit code 3 when the loss stops being finite.
"""

import argparse
import sys

from reasoning.common import die, is_master, run_main
from reasoning.pretrain import NonFiniteLossError, add_train_args, config_from_args, train
from reasoning.report import log_stage


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m scripts.base_train -- --depth 4` passes the separator through
        argv = argv[1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    config = config_from_args(parser.parse_args(argv))
    try:
        summary = train(config)
    except NonFiniteLossError as e:
        die(str(e), code=3)
    m = summary["metrics"]
    if is_master() and summary["finished"]:
        series = {k: v for k, v in summary["series"].items() if v}
        tables = {"samples": summary["samples"]} if summary["samples"] else None
        log_stage("base_train", config=summary["config"] | {"model": summary["model_config"]},
                  metrics={k: m[k] for k in ("initial_val_bpb", "val_bpb", "min_val_bpb", "train_loss", "tok_per_s",
                                             "mfu", "params")},
                  series=series, seconds=summary["seconds"], tables=tables, base_dir=config.base_dir)

    def fmt(value, spec):
        return "nan" if value is None else format(value, spec)

    status = "" if summary["finished"] else f" stopped_at={summary['step']}"
    if is_master():
        print(f"RESULT val_bpb={fmt(m['val_bpb'], '.4f')} steps={summary['step']} "
              f"tok_per_s={fmt(m['tok_per_s'], '.0f')} mfu={fmt(m['mfu'], '.4f')}{status}", flush=True)


if __name__ == "__main__":
    run_main(main)
