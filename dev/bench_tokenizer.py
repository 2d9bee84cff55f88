"""Benchmark: rustbpe vs HF `tokenizers` BPE training, and tiktoken vs HF batch-encode throughput.

    python -m dev.bench_tokenizer [--mb 20] [--vocab-size 8192] [--rounds 1]

Both trainers see the same offline-generated corpus (templated prose over a Zipfian pseudo-word lexicon,
arithmetic, code-like text), the same split regex and the same number of merges, timed one after the other in
one process (alternating order when --rounds > 1). Agreement is checked too: bytes/token on held-out text and
the overlap of the two learned vocabularies, so a faster trainer that learns something different would show.
"""

import argparse
import itertools
import random
import statistics
import time

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from reasoning.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, train_tokenizer


def make_corpus(target_bytes: int, seed: int) -> list[str]:
    """Documents of mixed kinds until `target_bytes` of UTF-8 text exist. Deterministic for a given seed."""
    rng = random.Random(seed)
    syllables = ["ka", "ro", "mi", "ten", "sa", "lo", "ver", "an", "is", "pra", "dul", "che", "on", "ex", "th", "ou",
                 "ba", "ne", "zi", "gor", "al", "ur", "fi", "ly", "ment", "ing", "ed", "qua", "sto", "pe"]
    lexicon = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(30000)})
    rng.shuffle(lexicon)
    zipf_cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(lexicon))))
    function_words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "was", "on", "with", "as"]
    identifiers = ["total", "count", "value", "items", "result", "index", "data", "key", "node", "buf", "size"]

    def prose() -> str:
        sentences = []
        for _ in range(rng.randint(3, 12)):
            words = rng.choices(lexicon, cum_weights=zipf_cumulative, k=rng.randint(5, 20))
            for i in range(0, len(words), 3):
                words.insert(i, rng.choice(function_words))
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", "!", ",\""]))
        return " ".join(sentences)

    def arithmetic() -> str:
        x = rng.randint(1, 999)
        lines = [f"Problem: start with {x}."]
        for step in range(1, rng.randint(2, 6)):
            op, y = rng.choice("+-*"), rng.randint(1, 99)
            new = x + y if op == "+" else x - y if op == "-" else x * y
            lines.append(f"Step {step}: {x} {op} {y} = {new}.")
            x = new
        lines.append(f"The answer is \\boxed{{{x}}}.")
        return "\n".join(lines)

    def code() -> str:
        name = "_".join(rng.choices(identifiers, k=2))
        var, other = rng.sample(identifiers, 2)
        body = [f"def {name}({var}, {other}={rng.randint(0, 9)}):",
                f"    \"\"\"{prose()[:60]}\"\"\"",
                f"    for i in range({var}):",
                f"        if i % {rng.randint(2, 9)} == 0:",
                f"            {other} += {var}[i] * {rng.randint(1, 99)}",
                f"    return {other}  # {rng.choice(lexicon)}"]
        return "\n".join(body) + "\n"

    docs, size = [], 0
    kinds = [prose, prose, arithmetic, code]
    while size < target_bytes:
        doc = "\n\n".join(rng.choice(kinds)() for _ in range(rng.randint(1, 4)))
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return docs


def train_hf(docs: list[str], vocab_size: int) -> HFTokenizer:
    """HF BPE configured like ours: split with the same regex, then byte-level mapping (no regex of its own)."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def hf_token_bytes(tokenizer: HFTokenizer) -> set[bytes]:
    """HF byte-level tokens are spelled in GPT-2's printable byte alphabet; map them back to raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    char_to_byte, extra = {}, 0
    for b in range(256):
        if b in printable:
            char_to_byte[chr(b)] = b
        else:
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    return {bytes(char_to_byte[c] for c in token) for token in tokenizer.get_vocab()}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="training corpus size in MB")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocab (256 bytes + merges), both sides")
    parser.add_argument("--rounds", type=int, default=1, help="training runs per side (medians reported)")
    parser.add_argument("--encode-repeats", type=int, default=3)
    args = parser.parse_args()

    (docs, heldout), gen_s = timed(lambda: (make_corpus(int(args.mb * 1e6), seed=0), make_corpus(1_000_000, seed=1)))
    corpus_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    heldout_bytes = sum(len(d.encode("utf-8")) for d in heldout)
    print(f"corpus: {len(docs):,} docs, {corpus_mb:.1f} MB (generated in {gen_s:.1f}s); vocab {args.vocab_size}")

    rust_times, hf_times = [], []
    for round_index in range(args.rounds):
        sides = ["rustbpe", "hf"] if round_index % 2 == 0 else ["hf", "rustbpe"]
        for side in sides:
            if side == "rustbpe":  # our vocab_size counts special tokens; give rustbpe the same number of merges
                ours, seconds = timed(lambda: train_tokenizer(docs, args.vocab_size + len(SPECIAL_TOKENS)))
                rust_times.append(seconds)
            else:
                hf, seconds = timed(lambda: train_hf(docs, args.vocab_size))
                hf_times.append(seconds)
            print(f"  round {round_index}: {side:<8} trained in {seconds:.1f}s", flush=True)

    ours_bpt = heldout_bytes / sum(len(ids) for ids in ours.encode(heldout))
    hf_bpt = heldout_bytes / sum(len(e.ids) for e in hf.encode_batch(heldout))
    ours_vocab = set(ours.mergeable_ranks)
    overlap = len(ours_vocab & hf_token_bytes(hf)) / len(ours_vocab)

    tiktoken_times, hf_encode_times = [], []
    for _ in range(args.encode_repeats):  # interleaved so both see the same machine load
        tiktoken_times.append(timed(lambda: ours.encode(docs, num_threads=8))[1])
        hf_encode_times.append(timed(lambda: hf.encode_batch(docs))[1])

    rust_s, hf_s = statistics.median(rust_times), statistics.median(hf_times)
    tiktoken_mb_s = corpus_mb / statistics.median(tiktoken_times)
    hf_mb_s = corpus_mb / statistics.median(hf_encode_times)
    print()
    print(f"{'':<22}{'rustbpe+tiktoken':>18}{'HF tokenizers':>16}")
    print(f"{'train seconds (med)':<22}{rust_s:>18.1f}{hf_s:>16.1f}")
    print(f"{'vocab (BPE)':<22}{ours.bpe_vocab_size:>18}{hf.get_vocab_size():>16}")
    print(f"{'held-out bytes/token':<22}{ours_bpt:>18.3f}{hf_bpt:>16.3f}")
    print(f"{'batch encode MB/s':<22}{tiktoken_mb_s:>18.1f}{hf_mb_s:>16.1f}")
    print(f"vocabulary overlap: {overlap:.1%} of rustbpe tokens also learned by HF")
    print(f"RESULT train_time_ratio={rust_s / hf_s:.3f} encode_mb_s={tiktoken_mb_s:.1f} "
          f"hf_encode_mb_s={hf_mb_s:.1f} vocab_overlap={overlap:.3f}")


if __name__ == "__main__":
    main()
