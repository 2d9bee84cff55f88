"""Prepare the pretraining corpus (parquet shards with a `text` column) in `--data-dir` (default
$REASONING_DATA_DIR or <base>/base_data); reading them is reasoning/dataset.py.

    python -m scripts.base_data -n 8            # FineWeb-Edu shards 0..7 + the validation shard, from the HF hub
    python -m scripts.base_data --synthetic     # the offline synthetic corpus (tasks/synthetic.py)
"""

import argparse
import os

from reasoning.common import UserError, run_main
from reasoning.dataset import (DATA_DIR_ENV, DEFAULT_BASE_URL, DEFAULT_MAX_SHARD, DEFAULT_PATTERN, download_indices,
                               download_shards, list_shards, resolve_data_dir)
from tasks.synthetic import write_synthetic_corpus



def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Prepare the pretraining corpus (parquet shards with a text column).")
    parser.add_argument("-n", "--num-train-shards", type=int, default=8,
                        help="download train shards 0..N-1 (-1: all) plus the validation shard")
    parser.add_argument("--data-dir", default=None, help=f"target folder (default ${DATA_DIR_ENV} or <base>/base_data)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL)
    parser.add_argument("--pattern", default=DEFAULT_PATTERN, help="file name pattern with {index}")
    parser.add_argument("--max-shard", type=int, default=DEFAULT_MAX_SHARD, help="index of the last (validation) shard")
    parser.add_argument("--retries", type=int, default=5, help="attempts per shard")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubles each time)")
    parser.add_argument("--synthetic", action="store_true", help="write the offline synthetic corpus instead")
    parser.add_argument("--num-shards", type=int, default=8, help="--synthetic: shards to write (last one is val)")
    parser.add_argument("--docs-per-shard", type=int, default=2000, help="--synthetic: documents per shard")
    parser.add_argument("--seed", type=int, default=0, help="--synthetic: corpus seed")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)

    if args.synthetic:
        if args.num_shards < 2 or args.docs_per_shard < 1:
            raise UserError(f"--num-shards {args.num_shards} --docs-per-shard {args.docs_per_shard}: "
                            f"expected at least 2 shards (one is validation) and 1 document per shard")
        os.makedirs(data_dir, exist_ok=True)
        write_synthetic_corpus(data_dir, args.num_shards, args.docs_per_shard, args.seed)
        print(f"synthetic corpus: {len(list_shards(data_dir))} shards in {data_dir}", flush=True)
        return data_dir

    if "{index" not in args.pattern:
        raise UserError(f"--pattern {args.pattern!r}: expected a file name pattern containing {{index}}")
    indices = download_indices(args.num_train_shards, args.max_shard)
    print(f"downloading {len(indices)} shards to {data_dir} with {args.workers} workers", flush=True)
    download_shards(indices, data_dir, workers=args.workers, progress=True, base_url=args.base_url,
                    pattern=args.pattern, retries=max(1, args.retries), backoff=max(0.0, args.backoff))
    print(f"done: {len(list_shards(data_dir))} shards in {data_dir}", flush=True)
    return data_dir


if __name__ == "__main__":
    run_main(main)
