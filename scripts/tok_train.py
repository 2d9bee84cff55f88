"""Train the BPE tokenizer on the pretraining shards and save it to `<base>/tokenizer/`.

    python -m scripts.tok_train                      # <base>/base_data, vocab 32768
    python -m scripts.tok_train --vocab-size 4096 --max-chars 2e7 --data-dir DIR

Only the training shards are read (the last shard in sorted order is validation), so tok_eval and base_eval
measure compression and bits-per-byte on text the tokenizer never saw.
"""

import argparse
import time

from reasoning.common import UserError, run_main
from reasoning.dataset import iter_documents, resolve_data_dir, split_shards
from reasoning.tokenizer import MIN_VOCAB_SIZE, cap_text_stream, tokenizer_dir, train_tokenizer
from reasoning.report import log_stage


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None,
                        help="folder of parquet shards (default $REASONING_DATA_DIR or <base>/base_data)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="total vocab incl. special tokens")
    parser.add_argument("--max-chars", type=float, default=2e9, help="stop after this many training characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    parser.add_argument("--out-dir", default=None, help="where to save (default <base>/tokenizer)")
    args = parser.parse_args()
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise UserError(f"--max-chars and --doc-cap must be positive, got {args.max_chars:g} and {args.doc_cap}")
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab-size {args.vocab_size}: expected >= {MIN_VOCAB_SIZE} (256 bytes + special tokens)")

    data_dir = resolve_data_dir(args.data_dir)
    split_shards(data_dir)  # fail now, with the message that says how to get data, rather than mid-training
    out_dir = args.out_dir or tokenizer_dir()

    chars_seen = 0

    def counted(texts):
        nonlocal chars_seen
        for text in texts:
            chars_seen += len(text)
            yield text

    docs = cap_text_stream(iter_documents(data_dir, split="train"), max_chars=int(args.max_chars), doc_cap=args.doc_cap)
    start = time.perf_counter()
    tokenizer = train_tokenizer(counted(docs), args.vocab_size, progress=True, total_chars=int(args.max_chars))
    train_seconds = time.perf_counter() - start
    if chars_seen == 0:
        raise UserError(f"the training shards in {data_dir} contain no text")
    tokenizer.save(out_dir)

    print(f"trained on {chars_seen:,} characters from {data_dir} in {train_seconds:.1f}s")
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the corpus only supported {tokenizer.vocab_size} tokens (asked for {args.vocab_size})")
    print(f"vocab size {tokenizer.vocab_size} ({tokenizer.bpe_vocab_size} BPE + {len(tokenizer.special_tokens)} "
          f"special), saved to {out_dir}")
    log_stage("tok_train", config={"vocab_size_requested": args.vocab_size, "data_dir": data_dir,
                                   "max_chars": args.max_chars, "doc_cap": args.doc_cap},
              metrics={"vocab_size": tokenizer.vocab_size, "train_seconds": train_seconds, "train_chars": chars_seen},
              seconds=train_seconds)
    print(f"RESULT vocab_size={tokenizer.vocab_size} train_seconds={train_seconds:.2f}")


if __name__ == "__main__":
    run_main(main)
