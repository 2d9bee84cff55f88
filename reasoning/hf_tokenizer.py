"""Hugging Face tokenizers behind our Tokenizer interface, rendering conversations in the model's own chat format.

Why it exists: a Qwen3 or Llama checkpoint only works with the tokenizer and chat format it was trained with, but
SFT, RL, the engine and the chat UIs speak our interface (reasoning/tokenizer.py): `encode` that never emits
special tokens, `encode_special` by our names, `render_conversation -> (ids, mask)`. `HFTokenizer` wraps the
model's `tokenizer.json` (the `tokenizers` library) and maps that contract onto one of three chat formats:

- ChatML (Qwen): `<|im_start|>role\\n ... <|im_end|>\\n`, thinking as `<think>\\n ... \\n</think>\\n\\n`;
- Llama 3: `<|begin_of_text|>`, `<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>`;
- ours (folders written by `python -m scripts.hf_export`): identical to reasoning/tokenizer.py's rendering.

Our special-token names map onto the format's tokens: `<|assistant_end|>` -> `<|im_end|>` / `<|eot_id|>` (the
engine's stop token), `<|think_start|>`/`<|think_end|>` -> `<think>`/`</think>` when the vocabulary has them
(otherwise thinking is written as plain-text tags), `<|bos|>` -> the model's BOS, or `<|endoftext|>` for models
without one (Qwen) so it still delimits documents and stops generation. Neither Qwen nor Llama has our calculator
tokens: python parts are rendered as Markdown code fences (python / output), `encode_special` of a python token
raises, and the engine therefore runs without tool calls.

Ordinary text is encoded by a copy of the tokenizer with no added tokens, so a literal "<|im_end|>" or "<think>"
inside user text stays plain text (the HF tokenizer would turn it into a control token). The module also converts
our tiktoken vocabulary into a `tokenizer.json` for export (byte-level BPE; merges recovered from the ranks).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from reasoning.common import UserError
from reasoning.tokenizer import SPECIAL_TOKENS, _validate_conversation

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers keep the template out of tokenizer_config.json
_ROLES = ("system", "user", "assistant")
_CODE_FENCES = {"python": ("```python\n", "\n```\n"), "output": ("```output\n", "\n```\n")}
_BOS_FALLBACKS = ("<|begin_of_text|>", "<|bos|>", "<|endoftext|>", "<s>")


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as templates: text in which added-token strings stand for those tokens."""
    name: str
    markers: tuple[str, ...]  # added tokens that identify the format
    begin: str  # opens every conversation
    header: dict  # role -> text before the message content
    footer: dict  # role -> text after it; the assistant footer starts with `assistant_end`
    assistant_end: str
    think: tuple[str, str]
    python: tuple[str, str]
    output: tuple[str, str]
    aliases: dict  # our special-token name -> this format's token (available when the vocabulary has it)


_THINK_TAGS = ("<think>\n", "\n</think>\n\n")  # Qwen3's layout; on vocabularies without <think> it is plain text
CHAT_FORMATS = (
    ChatFormat("reasoning", ("<|assistant_start|>", "<|assistant_end|>"), "<|bos|>",
               {r: f"<|{r}_start|>" for r in _ROLES}, {r: f"<|{r}_end|>" for r in _ROLES}, "<|assistant_end|>",
               ("<|think_start|>", "<|think_end|>"), ("<|python_start|>", "<|python_end|>"),
               ("<|output_start|>", "<|output_end|>"), {name: name for name in SPECIAL_TOKENS}),
    ChatFormat("chatml", ("<|im_start|>", "<|im_end|>"), "",
               {r: f"<|im_start|>{r}\n" for r in _ROLES}, {r: "<|im_end|>\n" for r in _ROLES}, "<|im_end|>",
               _THINK_TAGS, _CODE_FENCES["python"], _CODE_FENCES["output"],
               {"<|assistant_end|>": "<|im_end|>", "<|think_start|>": "<think>", "<|think_end|>": "</think>"}),
    ChatFormat("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>",
               {r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in _ROLES}, {r: "<|eot_id|>" for r in _ROLES},
               "<|eot_id|>", _THINK_TAGS, _CODE_FENCES["python"], _CODE_FENCES["output"],
               {"<|assistant_end|>": "<|eot_id|>", "<|think_start|>": "<think>", "<|think_end|>": "</think>"}),
)


def read_json_object(path: str, what: str | None = None) -> dict:
    """A JSON object file of a Hugging Face folder; a missing (when `what` names it), unreadable or non-object file
    is a one-line UserError naming the path."""
    if what is not None and not os.path.isfile(path):
        raise UserError(f"{path} is missing ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable or not JSON ({type(e).__name__})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def is_hf_tokenizer_dir(directory: str) -> bool:
    """A Hugging Face tokenizer folder, as opposed to ours (which also has a tokenizer.json, plus the tiktoken
    ranks file)."""
    return (os.path.isfile(os.path.join(directory, TOKENIZER_FILE))
            and not os.path.isfile(os.path.join(directory, "tokenizer.tiktoken")))


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _detect_format(added: dict, chat_template: str | None, source: str) -> ChatFormat:
    candidates = [f for f in CHAT_FORMATS if all(m in added for m in f.markers)]
    if chat_template:  # a vocabulary may hold several formats' tokens; the template says which one is used
        used = [f for f in candidates if f.markers[0] in chat_template]
        candidates = used or candidates
    if not candidates:
        raise UserError(f"{source}: no supported chat format (expected ChatML <|im_start|>/<|im_end|>, Llama 3 "
                        "<|start_header_id|>/<|end_header_id|>/<|eot_id|>, or our <|assistant_start|> tokens)")
    return candidates[0]


class HFTokenizer:
    """Our Tokenizer interface (reasoning/tokenizer.py) over a Hugging Face tokenizer.json."""

    def __init__(self, tokenizer_json: str, tokenizer_config: dict | None = None, source: str = "tokenizer.json"):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            spec = json.loads(tokenizer_json)
            if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
                raise ValueError("no 'model' section")
            self._full = RustTokenizer.from_str(tokenizer_json)
            # ordinary text goes through a copy without the added vocabulary: it can never produce control tokens
            self._plain = RustTokenizer.from_str(json.dumps(dict(spec, added_tokens=[], post_processor=None)))
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise UserError(f"{source} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        self.source = source
        self.tokenizer_json = tokenizer_json
        self.tokenizer_config = dict(tokenizer_config or {})
        self.added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
        self.vocab_size = max(self._full.get_vocab(with_added_tokens=True).values()) + 1
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        self.chat_template = self.tokenizer_config.get("chat_template")
        if not isinstance(self.chat_template, str):
            self.chat_template = None  # a list of named templates is rare; format detection then uses the tokens
        self.format = _detect_format(self.added, self.chat_template, source)
        bos = _token_content(self.tokenizer_config.get("bos_token"))
        if bos not in self.added:
            bos = next((t for t in _BOS_FALLBACKS if t in self.added), None)
        self.bos_token_id = self.added.get(bos)
        self.special_tokens = {name: self.added[token] for name, token in self.format.aliases.items()
                               if token in self.added}
        if self.bos_token_id is not None:
            self.special_tokens["<|bos|>"] = self.bos_token_id
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))) \
            if self.added else None
        self._template_cache = {}
        self._token_bytes = None

    # ------------------------------------------------------------------ persistence

    @classmethod
    def load(cls, directory: str) -> HFTokenizer:
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing (a Hugging Face model folder needs its tokenizer.json)")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            tokenizer_json = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not a Hugging Face tokenizer.json (not valid UTF-8 at byte {e.start + 1})") \
                from None
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        config = read_json_object(config_path) if os.path.isfile(config_path) else {}
        template_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if "chat_template" not in config and os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                config["chat_template"] = f.read()
        return cls(tokenizer_json, config, source=path)

    def save(self, directory: str) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) as loaded."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(self.tokenizer_json)
        with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(self.tokenizer_config, f, indent=2)

    # ------------------------------------------------------------------ encode / decode

    def encode_special(self, name: str) -> int:
        """One of our special-token names (mapped onto this format), or any added token of the vocabulary."""
        if name in self.special_tokens:
            return self.special_tokens[name]
        if name in self.added:
            return self.added[name]
        raise ValueError(f"special token {name!r} has no equivalent in this {self.format.name} tokenizer "
                         f"(available: {sorted(self.special_tokens)} and the vocabulary's added tokens)")

    def _as_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ordinary text -> ids; never emits added/special tokens. `num_threads` is accepted for interface
        compatibility (the tokenizers library parallelises batches itself)."""
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return head + self._plain.encode(text, add_special_tokens=False).ids + tail
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            rows = [e.ids for e in self._plain.encode_batch(list(text), add_special_tokens=False)]
            return [head + row + tail for row in rows] if head or tail else rows
        raise ValueError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids) -> str:
        return self._full.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id])

    @property
    def token_bytes(self) -> torch.Tensor:
        """(vocab_size,) int32 UTF-8 byte length of each token; 0 for added tokens (used by bits-per-byte)."""
        if self._token_bytes is None:
            lengths = [0] * self.vocab_size
            added_ids = set(self.added.values())
            for token, token_id in self._full.get_vocab(with_added_tokens=False).items():
                if token_id in added_ids:
                    continue
                # byte-level BPE spells every byte as one character, so the string length is the byte length
                lengths[token_id] = len(token) if self._byte_level else len(self.decode([token_id]).encode("utf-8"))
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32)
        return self._token_bytes

    # ------------------------------------------------------------------ chat rendering

    def _template(self, template: str) -> list:
        """Template text -> pieces: ints for added tokens written in it, strs for the text between them."""
        pieces = self._template_cache.get(template)
        if pieces is None:
            pieces, position = [], 0
            for match in (self._special_re.finditer(template) if self._special_re else ()):
                if match.start() > position:
                    pieces.append(template[position:match.start()])
                pieces.append(self.added[match.group()])
                position = match.end()
            if position < len(template):
                pieces.append(template[position:])
            self._template_cache[template] = pieces
        return pieces

    def _encode_pieces(self, pieces: list) -> list[int]:
        """Adjacent text pieces are encoded together, as the model's own template would tokenize them."""
        ids, text = [], ""
        for piece in pieces:
            if isinstance(piece, str):
                text += piece
                continue
            if text:
                ids.extend(self._plain.encode(text, add_special_tokens=False).ids)
                text = ""
            ids.append(piece)
        if text:
            ids.extend(self._plain.encode(text, add_special_tokens=False).ids)
        return ids

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Conversation -> (ids, mask) in the model's chat format, truncated to max_tokens. mask = 1 on what the
        assistant writes (its parts, the think/code wrappers and the end-of-turn token), 0 on role headers, the
        text after the end-of-turn token, user/system text and tool output."""
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        ids, mask = self._render(_validate_conversation(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict, think: bool = False) -> list[int]:
        """Prompt ids ending with the assistant header (plus the think opener with think=True); a trailing
        assistant message is dropped."""
        messages = _validate_conversation(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        opener = self.format.header["assistant"] + (self.format.think[0] if think else "")
        return ids + self._encode_pieces(self._template(opener))

    def _render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        fmt, template = self.format, self._template
        ids, mask = [], []

        def emit(pieces: list, trained: int):
            tokens = self._encode_pieces(pieces)
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        emit(template(fmt.begin), 0)
        for message in messages:
            role, content = message["role"], message["content"]
            if role != "assistant":
                emit(template(fmt.header[role]) + [content] + template(fmt.footer[role]), 0)
                continue
            emit(template(fmt.header[role]), 0)  # forced by the prompt, not a model decision
            body = []  # everything the assistant writes, up to a tool output or the end of the turn
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                kind, text = part["type"], part["text"]
                if kind == "text":
                    body.append(text)
                elif kind == "python_output":  # written by the tool: never trained on
                    emit(body, 1)
                    body = []
                    emit(template(fmt.output[0]) + [text] + template(fmt.output[1]), 0)
                else:
                    opener, closer = fmt.think if kind == "think" else fmt.python
                    body += template(opener) + [text] + template(closer)
            footer = template(fmt.footer["assistant"])
            emit(body + footer[:1], 1)  # the end-of-turn token is the model's decision to stop
            emit(footer[1:], 0)
        return ids, mask


# ---------------------------------------------------------------------------------------------- export helpers

def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2): printable bytes stand for themselves, the other 68 bytes are shifted
    to code points from 256 up, so every byte sequence is a printable string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each multi-byte token, in rank order. BPE on a token's bytes restricted to merges
    of lower rank stops at exactly two parts: the pair whose merge made the token."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1])
                if pair_rank is not None and pair_rank < rank and (best is None or pair_rank < best[0]):
                    best = (pair_rank, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer_json_from_ranks(mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: list[str]) -> str:
    """A byte-level BPE tokenizer.json that encodes exactly like our tiktoken tokenizer: same split regex, vocab
    spelled in the byte-level alphabet, merges in rank order, whole-piece lookup first (ignore_merges, as tiktoken
    does), special tokens after the vocabulary in our order."""
    from tokenizers import AddedToken, Regex, Tokenizer as RustTokenizer, decoders, models, pre_tokenizers

    alphabet = bytes_to_unicode()
    spell = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    vocab = {spell(token): rank for token, rank in mergeable_ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in _recover_merges(mergeable_ranks)]
    tokenizer = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer.to_str()


def native_chat_template() -> str:
    """A Jinja chat template for transformers' apply_chat_template that renders our format (reasoning in
    `reasoning_content`, as Qwen3 templates take it)."""
    return ("{{ bos_token }}{% for m in messages %}"
            "{% if m.role == 'assistant' %}<|assistant_start|>"
            "{% if m.reasoning_content %}<|think_start|>{{ m.reasoning_content }}<|think_end|>{% endif %}"
            "{{ m.content }}<|assistant_end|>"
            "{% else %}<|{{ m.role }}_start|>{{ m.content }}<|{{ m.role }}_end|>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant_start|>{% endif %}")
