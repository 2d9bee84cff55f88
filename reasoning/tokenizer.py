"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken, plus the chat rendering the model sees.

Why two libraries: rustbpe trains GPT-4-style BPE quickly from a text stream, but tiktoken's encoder is the
fast, battle-tested one for inference and data loading. Training hands tiktoken its merge table (token bytes ->
rank) and the same split regex, so both agree on every encoding.

The chat format (`render_conversation`) is the contract between SFT, RL, the engine and the chat UIs: special
tokens delimit roles, thinking and tool calls, and the loss mask marks exactly the tokens the assistant produces.
See dev/INTERFACES.md for the spec. References: nanochat (karpathy) tokenizer; tiktoken's `.tiktoken` file format.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Iterator

import tiktoken
import torch

from reasoning.common import UserError, atomic_write, atomic_write_json, atomic_write_text, get_base_dir, parse_json

# GPT-4's (cl100k) split pattern with one change: numbers are split into chunks of at most 2 digits instead of 3.
# A 3-digit chunking spends ~1100 vocab slots on numbers and makes place value depend on where the chunk boundaries
# fall (left-to-right 3-digit chunking is the worst variant for arithmetic in Singh & Strouse 2024). Single digits
# would be cleanest for arithmetic but make number-heavy math text ~2x longer; 1-2 digits (as nanochat uses at
# small vocab sizes) keeps the number vocabulary to 110 well-trained tokens and sequences short.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Order matters: their ids are assigned in this order right after the BPE vocabulary.
SPECIAL_TOKENS = [
    "<|bos|>",  # document delimiter, also the first token of every conversation
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|think_start|>", "<|think_end|>",
    "<|python_start|>", "<|python_end|>",  # a tool call the assistant writes
    "<|output_start|>", "<|output_end|>",  # the tool's result, forced into the context (not trained on)
]

# Latent reasoning (Coconut, reasoning/latent.py): deliberately not in SPECIAL_TOKENS, so trained vocabularies and
# checkpoints keep every id; `Tokenizer.with_special_tokens` appends them after the others when a latent model needs
# them (the model's embedding grows by as many rows).
LATENT_TOKENS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens
ASSISTANT_PART_TYPES = ("text", "think", "python", "python_output")

_FORMAT = "reasoning-tokenizer-v1"
_RANKS_FILE = "tokenizer.tiktoken"  # tiktoken's format: one "base64(token_bytes) rank" line per token
_META_FILE = "tokenizer.json"  # written last: its presence means the directory is complete
TOKEN_BYTES_FILE = "token_bytes.pt"


def _read_meta(meta_path: str) -> dict:
    """tokenizer.json (our metadata) checked field by field: a damaged or hand-edited file is a one-line UserError."""
    expected = f"a JSON object with format {_FORMAT!r}, pattern, bpe_vocab_size and special_tokens"
    with open(meta_path, "rb") as f:
        meta = parse_json(f.read(), meta_path, expected=f"our tokenizer metadata, {expected}")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{meta_path}: unknown tokenizer format {found!r}; expected {expected}")
    size, specials = meta.get("bpe_vocab_size"), meta.get("special_tokens")
    if not isinstance(meta.get("pattern"), str) or not isinstance(size, int) or isinstance(size, bool) or size < 1 \
            or not isinstance(specials, list) or not all(isinstance(t, str) for t in specials):
        raise UserError(f"{meta_path}: damaged tokenizer metadata; expected {expected} (a string, a positive integer, "
                        "a list of strings)")
    return meta


def _read_ranks(ranks_path: str, expected_size: int, meta_path: str) -> dict[bytes, int]:
    """tokenizer.tiktoken: one `<base64 token> <rank>` per line, ranks 0..n-1; anything else is a UserError
    naming the file and line."""
    ranks = {}
    with open(ranks_path, "rb") as f:
        for line_number, line in enumerate(f.read().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (ValueError, binascii.Error):
                raise UserError(f"{ranks_path}:{line_number}: expected '<base64 token> <rank>' "
                                "(a tiktoken ranks file)") from None
            if token in ranks:
                raise UserError(f"{ranks_path}:{line_number}: token listed twice (a tiktoken ranks file)")
            ranks[token] = rank
    if len(ranks) != expected_size:
        raise UserError(f"{ranks_path}: {len(ranks)} tokens but {meta_path} says {expected_size}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{ranks_path}: ranks must be the contiguous ids 0..{len(ranks) - 1}")
    return ranks


class Tokenizer:
    """A tiktoken Encoding with our special tokens, plus conversation rendering."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens: list[str] | None = None):
        special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if sorted(mergeable_ranks.values()) != list(range(len(mergeable_ranks))):
            raise ValueError("mergeable_ranks must map tokens to the contiguous ids 0..n-1")
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.bpe_vocab_size = len(mergeable_ranks)
        self.special_tokens = {name: self.bpe_vocab_size + i for i, name in enumerate(special_tokens)}
        self._enc = tiktoken.Encoding("reasoning", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self.special_tokens)
        self.vocab_size = self._enc.n_vocab
        self.bos_token_id = self.special_tokens.get("<|bos|>")
        self._token_bytes = None

    # ------------------------------------------------------------------ encode / decode

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; expected one of {list(self.special_tokens)}") from None

    def with_special_tokens(self, names: list[str]) -> Tokenizer:
        """This tokenizer with `names` appended as special tokens (ids from vocab_size on) where missing; the
        existing ids do not move."""
        missing = [name for name in names if name not in self.special_tokens]
        if not missing:
            return self
        return Tokenizer(self.mergeable_ranks, pattern=self.pattern, special_tokens=list(self.special_tokens) + missing)

    def _as_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ordinary text -> ids (a list of strings -> a list of id lists, encoded in parallel threads).

        Never emits special tokens, even when the text contains their literal strings: those are treated as
        plain characters, so user-controlled text cannot inject a role change. `prepend`/`append` add one
        token (an id or a special token name) to each sequence.
        """
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return head + self._enc.encode_ordinary(text) + tail
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            rows = self._enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [head + row + tail for row in rows] if head or tail else rows
        raise ValueError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def id_to_token(self, token_id: int) -> str:
        """The text of one token (special tokens by name; a partial UTF-8 sequence shows as U+FFFD)."""
        return self._enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> torch.Tensor:
        """(vocab_size,) int32: UTF-8 byte length of each token, 0 for special tokens (they stand for no text).

        Bits-per-byte divides the summed loss by the summed byte counts, which makes it comparable across vocabs.
        """
        if self._token_bytes is None:
            lengths = [0] * self.vocab_size
            for token, rank in self.mergeable_ranks.items():
                lengths[rank] = len(token)
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32)
        return self._token_bytes

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str) -> None:
        """Write the merge table (tiktoken format), metadata and token_bytes.pt; each file atomically."""
        os.makedirs(directory, exist_ok=True)
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}"
                 for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        atomic_write_text(os.path.join(directory, _RANKS_FILE), "\n".join(lines) + "\n")  # base64: plain ASCII
        atomic_write(os.path.join(directory, TOKEN_BYTES_FILE), lambda f: torch.save(self.token_bytes, f))
        meta = {"format": _FORMAT, "pattern": self.pattern, "bpe_vocab_size": self.bpe_vocab_size,
                "special_tokens": list(self.special_tokens), "vocab_size": self.vocab_size}
        atomic_write_json(os.path.join(directory, _META_FILE), meta, indent=1)

    @classmethod
    def load(cls, directory: str) -> Tokenizer:
        meta_path = os.path.join(directory, _META_FILE)
        ranks_path = os.path.join(directory, _RANKS_FILE)
        if not (os.path.isfile(meta_path) and os.path.isfile(ranks_path)):
            raise UserError(f"no tokenizer in {directory} (expected {_META_FILE} and {_RANKS_FILE})")
        meta = _read_meta(meta_path)
        ranks = _read_ranks(ranks_path, meta["bpe_vocab_size"], meta_path)
        try:
            return cls(ranks, pattern=meta["pattern"], special_tokens=meta["special_tokens"])
        except Exception as e:  # tiktoken rejects e.g. a pattern that does not compile; a hand-edited file
            raise UserError(f"{directory}: tokenizer files do not form a tokenizer ({str(e).splitlines()[0][:120]})") \
                from None

    # ------------------------------------------------------------------ chat rendering

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Conversation -> (ids, mask), both truncated to `max_tokens`. mask[i] = 1 where the assistant produced
        token i (its text, think and python spans, and <|assistant_end|>), 0 elsewhere."""
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        messages = _validate_conversation(conversation)
        ids, mask = self._render(messages)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict, think: bool = False) -> list[int]:
        """Prompt ids for sampling the next assistant turn: a trailing assistant message (the reference answer)
        is dropped and the ids end with <|assistant_start|>. `think=True` also primes <|think_start|>, so the
        model must open with a reasoning span (for RL/eval of thinking models)."""
        messages = _validate_conversation(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        ids.append(self.special_tokens["<|assistant_start|>"])
        if think:
            ids.append(self.special_tokens["<|think_start|>"])
        return ids

    def _render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        special = self.special_tokens
        ids, mask = [], []

        def add(tokens: list[int], trained: int):
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        def add_span(start: str, text: str, end: str, trained: int):
            add([special[start]] + self._enc.encode_ordinary(text) + [special[end]], trained)

        add([self.bos_token_id], 0)
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                add_span("<|system_start|>", content, "<|system_end|>", 0)
            elif role == "user":
                add_span("<|user_start|>", content, "<|user_end|>", 0)
            else:
                add([special["<|assistant_start|>"]], 0)  # forced by the prompt, not a model decision
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                for part in parts:
                    kind, text = part["type"], part["text"]
                    if kind == "text":
                        add(self._enc.encode_ordinary(text), 1)
                    elif kind == "think":
                        add_span("<|think_start|>", text, "<|think_end|>", 1)
                    elif kind == "python":
                        add_span("<|python_start|>", text, "<|python_end|>", 1)
                    else:  # python_output: written by the tool, so the model is never trained to predict it
                        add_span("<|output_start|>", text, "<|output_end|>", 0)
                add([special["<|assistant_end|>"]], 1)
        return ids, mask


def _validate_conversation(conversation) -> list[dict]:
    """Check the structure the renderer relies on; raise ValueError naming the message (and part) at fault."""
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ValueError(f"conversation must be a dict with a 'messages' list, got {type(conversation).__name__}"
                         + (f" with keys {sorted(conversation)}" if isinstance(conversation, dict) else ""))
    messages = conversation["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation['messages'] must be a non-empty list")
    turn = 0  # counts non-system messages: even -> user expected, odd -> assistant expected
    for i, message in enumerate(messages):
        where = f"conversation message {i}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: unknown role {role!r} (expected 'system', 'user' or 'assistant')")
        if role == "system":
            if i != 0:
                raise ValueError(f"{where}: a system message is only allowed as the first message")
        else:
            expected = "user" if turn % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"{where}: expected role {expected!r}, got {role!r} "
                                 "(after an optional system message, roles alternate user, assistant, user, ...)")
            turn += 1
        if role != "assistant" or isinstance(content, str):
            if not isinstance(content, str):
                raise ValueError(f"{where} ({role}): content must be a string, got {type(content).__name__}")
            if not content:
                raise ValueError(f"{where} ({role}): content is empty")
            continue
        if not isinstance(content, list) or not content:
            raise ValueError(f"{where} (assistant): content must be a non-empty string or a non-empty list of parts")
        previous_type = None
        for j, part in enumerate(content):
            part_where = f"{where} part {j}"
            if not isinstance(part, dict) or "type" not in part or "text" not in part:
                raise ValueError(f"{part_where}: expected a dict with 'type' and 'text', got {part!r:.80}")
            if part["type"] not in ASSISTANT_PART_TYPES:
                raise ValueError(f"{part_where}: unknown part type {part['type']!r} (expected one of "
                                 f"{', '.join(ASSISTANT_PART_TYPES)})")
            if not isinstance(part["text"], str):
                raise ValueError(f"{part_where}: text must be a string, got {type(part['text']).__name__}")
            # A tool may legitimately print nothing; every other part must carry text.
            if not part["text"] and part["type"] != "python_output":
                raise ValueError(f"{part_where}: {part['type']!r} part text is empty")
            if part["type"] == "python_output" and previous_type != "python":
                raise ValueError(f"{part_where}: a python_output part must directly follow a python part")
            previous_type = part["type"]
    if turn == 0:
        raise ValueError("conversation has no user message")
    return messages


# ---------------------------------------------------------------------- training


def train_tokenizer(text_iterator: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN,
                    progress: bool = False, total_chars: int | None = None) -> Tokenizer:
    """Train byte-level BPE with rustbpe. `vocab_size` counts the special tokens too, so the model's embedding
    table gets exactly that many rows. A corpus too small to supply every merge yields a smaller vocabulary.

    progress=True shows a tqdm bar (stderr) of the characters read, out of `total_chars` when given (the cap
    the text stream was cut to); reading the corpus is the long part, the merges follow it.
    """
    import rustbpe  # a training-only dependency; loading a saved tokenizer does not need it

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
                         f"tokens), got {vocab_size!r}")
    texts = _with_progress(text_iterator, total_chars) if progress else iter(text_iterator)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return Tokenizer(ranks, pattern=pattern)


def _with_progress(texts: Iterable[str], total_chars: int | None) -> Iterator[str]:
    """`texts`, counting their characters on a tqdm bar that closes when the stream ends."""
    from tqdm import tqdm

    bar = tqdm(total=total_chars, desc="tokenizer: reading text", unit="char", unit_scale=True, dynamic_ncols=True)
    try:
        for text in texts:
            bar.update(len(text))
            yield text
        if bar.total is not None and bar.n < bar.total:
            bar.total = bar.n  # the corpus ended before the cap: all of it was read
    finally:
        bar.close()


def cap_text_stream(texts: Iterable[str], max_chars: int | None = None, doc_cap: int | None = None) -> Iterator[str]:
    """Crop each document to `doc_cap` characters and stop once `max_chars` characters have been yielded.

    Long documents (code dumps, tables) would otherwise dominate the pair counts; the total cap bounds training time.
    """
    total = 0
    for text in texts:
        if doc_cap is not None:
            text = text[:doc_cap]
        if max_chars is not None:
            if total >= max_chars:
                return
            text = text[: max_chars - total]
        total += len(text)
        yield text


def tokenizer_dir(base_dir: str | None = None) -> str:
    return os.path.join(base_dir or get_base_dir(), "tokenizer")


def get_tokenizer(base_dir: str | None = None) -> Tokenizer:
    """The run's tokenizer from `<base>/tokenizer/`."""
    directory = tokenizer_dir(base_dir)
    if not os.path.isfile(os.path.join(directory, _META_FILE)):
        raise UserError(f"no tokenizer at {directory}; create it with `python -m scripts.tok_train` "
                        "(offline: run `python -m scripts.base_data --synthetic` first)")
    return Tokenizer.load(directory)
