"""Compression of the trained tokenizer: UTF-8 bytes per token on held-out text of several kinds.

    python -m scripts.tok_eval [--tokenizer-dir DIR] [--data-dir DIR]

Higher is better (more text per token = longer effective context, cheaper training). Reference encodings
(GPT-2, cl100k) are shown when tiktoken can load them; offline they are reported as skipped.
"""

import argparse
import os
import socket

import tiktoken

from reasoning.common import UserError, run_main
from reasoning.dataset import DATA_DIR_ENV, iter_documents, resolve_data_dir, split_shards
from reasoning.tokenizer import Tokenizer, get_tokenizer
from reasoning.report import log_stage

# Small hand-written held-out samples, one per kind of text the model meets.
SAMPLES = {
    "prose": (
        "The lighthouse keeper had kept a log for thirty-one years, and in all that time he had never once written "
        "the word \"calm\". Storms came in from the west, usually in late autumn, and the sea would throw itself "
        "against the rocks until the spray reached the lamp room. His daughter, who visited each summer, thought the "
        "log was a diary; it was not. It listed wind speeds, the state of the fog horn, the price of paraffin, and, "
        "on rare occasions, the names of ships that had passed too close. When the coastguard finally automated the "
        "light, they asked him what he would miss. He said he'd miss being useful at three in the morning.\n\n"
        "Researchers studying sleep have long noticed that people who work night shifts report worse mood, even "
        "when they sleep the same number of hours as day workers. One explanation is circadian misalignment: the "
        "body's internal clock keeps signalling 'day' while the person tries to rest."
    ),
    "math": (
        "Let $f(x) = 3x^2 - 12x + 7$. Completing the square, $f(x) = 3(x - 2)^2 - 5$, so the minimum value is "
        "$-5$ at $x = 2$.\n\nProblem: A train travels 240 km in 3 hours, then 150 km in 2 hours. What is its average "
        "speed?\nSolution: Total distance is 240 + 150 = 390 km and total time is 3 + 2 = 5 hours, so the average "
        "speed is 390 / 5 = 78 km/h. The answer is \\boxed{78}.\n\n"
        "We have $\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$. For $n = 100$ this gives $5050$. Since "
        "$\\binom{10}{3} = 120$ and $2^{10} = 1024$, the probability is $\\frac{120}{1024} = \\frac{15}{128}$.\n"
        "Step 1: 17 * 23 = 391. Step 2: 391 - 46 = 345. Step 3: 345 / 5 = 69. Final answer: 69.\n"
        "If $\\sqrt{2x+1} = 5$, then $2x + 1 = 25$, hence $x = 12$. Check: $\\sqrt{25} = 5$. \\boxed{12}"
    ),
    "code": (
        "def moving_average(values, window):\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n\n\n"
        "class Counter:\n"
        "    def __init__(self):\n"
        "        self.counts = {}\n\n"
        "    def add(self, key, n=1):\n"
        "        self.counts[key] = self.counts.get(key, 0) + n\n\n"
        "for line in open('data.csv'):\n"
        "    name, score = line.strip().split(',')\n"
        "    if int(score) >= 90:\n"
        "        print(name, 'passed with', score)\n"
        "x = [i * i for i in range(10) if i % 2 == 0]  # [0, 4, 16, 36, 64]\n"
    ),
}


def validation_text(data_dir: str | None, max_chars: int) -> str | None:
    """The first `max_chars` characters of the validation split (the last shard), or None when the default corpus
    folder has none yet. A folder named explicitly (--data-dir, $REASONING_DATA_DIR) must hold a corpus: silently
    dropping the row the user asked for would hide the mistake."""
    resolved = resolve_data_dir(data_dir)
    try:
        split_shards(resolved)
    except UserError as e:
        named = f"--data-dir {data_dir}" if data_dir else (
            f"${DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]}" if os.environ.get(DATA_DIR_ENV) else None)
        if named is not None:
            if not os.path.isdir(resolved):
                raise UserError(f"{named}: no such folder (expected parquet shards, the last of which is the "
                                "validation split)") from None
            raise UserError(f"{named}: {e}") from None
        print(f"val: skipped (no corpus at {resolved}; pass --data-dir DIR)")
        return None  # no corpus yet: the embedded samples still give a useful table
    pieces, total = [], 0
    for doc in iter_documents(data_dir, split="val"):
        pieces.append(doc[: max_chars - total])
        total += len(pieces[-1])
        if total >= max_chars:
            break
    return "\n".join(pieces) or None


def reference_encodings() -> dict:
    """GPT-2 and cl100k when tiktoken has them cached or can download them; None when it cannot."""
    refs = {}
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # a dead network should cost seconds, not a hang
    try:
        for name in ("gpt2", "cl100k_base"):
            try:
                refs[name] = tiktoken.get_encoding(name)
            except Exception:  # offline, proxy, corrupt cache: the comparison is optional either way
                refs[name] = None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return refs


def bytes_per_token(encode, text: str) -> float:
    return len(text.encode("utf-8")) / max(1, len(encode(text)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", default=None, help="default <base>/tokenizer")
    parser.add_argument("--data-dir", default=None,
                        help="parquet shards (default $REASONING_DATA_DIR or <base>/base_data)")
    parser.add_argument("--val-chars", type=int, default=5_000_000, help="characters of validation text to use")
    args = parser.parse_args()

    val = validation_text(args.data_dir, args.val_chars)  # first: a bad --data-dir fails before any work
    tokenizer = Tokenizer.load(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer()
    texts = dict(SAMPLES)
    if val is not None:
        texts["val"] = val
    refs = reference_encodings()

    columns = [("ours", tokenizer.encode)]
    columns += [(name, enc.encode_ordinary if enc else None) for name, enc in refs.items()]
    print(f"bytes/token (higher = better compression); our vocab {tokenizer.vocab_size}")
    print(f"{'kind':<8}{'bytes':>11}" + "".join(f"{name:>14}" for name, _ in columns))
    ours = {}
    for kind, text in texts.items():
        row = f"{kind:<8}{len(text.encode('utf-8')):>11,}"
        for name, encode in columns:
            if encode is None:
                row += f"{'skipped':>14}"
                continue
            ratio = bytes_per_token(encode, text)
            if name == "ours":
                ours[kind] = ratio
            row += f"{ratio:>14.3f}"
        print(row)
    for name, enc in refs.items():
        if enc is None:
            print(f"{name}: skipped (offline)")
    headline = ours.get("val", sum(ours.values()) / max(len(ours), 1))
    log_stage("tok_eval", config={"vocab_size": tokenizer.vocab_size},
              metrics={"bytes_per_token": headline} | {f"bytes_per_token_{k}": v for k, v in ours.items()})
    print("RESULT " + " ".join(f"bytes_per_token_{kind}={ratio:.3f}" for kind, ratio in ours.items()))


if __name__ == "__main__":
    run_main(main)
