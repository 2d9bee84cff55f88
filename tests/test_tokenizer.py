"""Tokenizer: lossless encode/decode, special-token safety, persistence, and the chat rendering/mask contract."""

import os
import random
import sys

import pytest
import rustbpe
import torch

from reasoning.common import UserError
from reasoning.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, TOKEN_BYTES_FILE, Tokenizer, cap_text_stream,
                                 get_tokenizer, train_tokenizer)

VOCAB = 512


def _corpus(num_docs=300, seed=0):
    """Varied little documents: pseudo-words, numbers, arithmetic, code-ish lines, some unicode."""
    rng = random.Random(seed)
    syllables = ["ta", "ke", "ri", "son", "mal", "the", "ing", "er", "qu", "an", "lo", "vex", "zu", "pha"]
    extras = ["café", "naïve", "über", "数学", "😀", "λ", "→"]
    docs = []
    for _ in range(num_docs):
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(20, 60))]
        words += [str(rng.randint(0, 99999)), rng.choice(extras), f"{rng.randint(1, 99)} + {rng.randint(1, 99)} = ?"]
        rng.shuffle(words)
        docs.append(" ".join(words) + "\n    return x  # done\n")
    return docs


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), VOCAB)


# ---------------------------------------------------------------------- training + encode/decode


def test_trained_vocab_layout(tok):
    assert tok.vocab_size == VOCAB  # the requested size counts the special tokens
    assert tok.bpe_vocab_size == VOCAB - len(SPECIAL_TOKENS)
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(tok.bpe_vocab_size, VOCAB))  # distinct, above the BPE vocab, in the documented order
    assert tok.bos_token_id == tok.encode_special("<|bos|>")
    assert tok.id_to_token(tok.encode_special("<|think_end|>")) == "<|think_end|>"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|eos|>")


def test_vocab_size_validation():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 269"):
        train_tokenizer(["abc"], 200)


def test_small_corpus_gives_smaller_vocab():
    # Only a handful of distinct pairs exist, so fewer merges than asked for can be learned.
    tok = train_tokenizer(["ab ab ab"] * 10, 400)
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size < 400
    assert tok.decode(tok.encode("ab ab")) == "ab ab"


@pytest.mark.parametrize("text", [
    "",
    "Hello, world! The quick brown fox's 3 jumps.",
    "naïve café über straße — ünïcödé, 数学是美丽的, Ελληνικά, русский",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵",
    "  leading\n\n\n   trailing   \t\t\r\n  ",
    "x" * 1000 + " 12345678901234567890",
    "\x00\x01 bytes \ufffd",
])
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.bpe_vocab_size for i in ids)
    assert (ids == []) == (text == "")


def test_matches_rustbpe_reference_encoder():
    # The same merge table must encode identically in rustbpe (the trainer) and tiktoken (our runtime).
    reference = rustbpe.Tokenizer()
    reference.train_from_iterator(iter(_corpus(seed=1)), 400, pattern=SPLIT_PATTERN)
    tok = Tokenizer({bytes(t): r for t, r in reference.get_mergeable_ranks()})
    for text in _corpus(num_docs=20, seed=2) + ["numbers 1 22 333 4444 55555", "a\n\n  b\tc 😀"]:
        assert tok.encode(text) == reference.encode(text)


def test_number_split_is_at_most_two_digits(tok):
    pieces = [tok.decode([i]) for i in tok.encode("x 1234567 y")]
    assert "".join(pieces) == "x 1234567 y"
    assert max(len(p) for p in pieces if p.isdigit()) <= 2


def test_batch_matches_single(tok):
    texts = ["first text", "", "second: 😀 12 + 34", "  spaces  "]
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    wrapped = tok.encode(texts, prepend="<|bos|>", append=end)
    assert wrapped == [[bos] + tok.encode(t) + [end] for t in texts]
    assert tok.encode("hi", prepend=bos) == [bos] + tok.encode("hi")
    with pytest.raises(ValueError, match="expects a str or a list of str"):
        tok.encode(["ok", 3])


def test_literal_special_strings_are_ordinary_text(tok):
    text = "before " + " ".join(SPECIAL_TOKENS) + " after<|bos|>"
    ids = tok.encode(text)
    assert all(i < tok.bpe_vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert all(i < tok.bpe_vocab_size for row in tok.encode([text, text]) for i in row)


def test_token_bytes_consistent_with_decoding(tok):
    token_bytes = tok.token_bytes
    assert token_bytes.shape == (tok.vocab_size,)
    for i in range(tok.bpe_vocab_size):
        assert token_bytes[i] == len(tok._enc.decode_single_token_bytes(i)) >= 1
    assert token_bytes[tok.bpe_vocab_size:].eq(0).all()
    text = "ünïcödé 😀 and 12345 tokens"
    assert int(token_bytes[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------- persistence


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(["tokenizer.json", "tokenizer.tiktoken", TOKEN_BYTES_FILE])
    loaded = Tokenizer.load(str(tmp_path))
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.pattern == tok.pattern and loaded.special_tokens == tok.special_tokens
    assert loaded.vocab_size == tok.vocab_size
    text = "roundtrip 😀 12345 <|bos|>"
    assert loaded.encode(text) == tok.encode(text)
    assert torch.equal(torch.load(tmp_path / TOKEN_BYTES_FILE), tok.token_bytes)
    tok.save(str(tmp_path))  # overwriting in place works and leaves no temp files behind
    assert len(os.listdir(tmp_path)) == 3


def test_get_tokenizer(tok, tmp_path):
    with pytest.raises(UserError, match=r"no tokenizer at .*tokenizer; create it with `python -m scripts.tok_train`"):
        get_tokenizer(str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    assert get_tokenizer(str(tmp_path)).mergeable_ranks == tok.mergeable_ranks
    (tmp_path / "tokenizer" / "tokenizer.tiktoken").unlink()
    with pytest.raises(UserError, match="no tokenizer in"):
        Tokenizer.load(str(tmp_path / "tokenizer"))


def test_cap_text_stream():
    docs = ["abcdef", "ghij", "klmnop", "qr"]
    assert list(cap_text_stream(docs, doc_cap=3)) == ["abc", "ghi", "klm", "qr"]
    assert list(cap_text_stream(docs, max_chars=8)) == ["abcdef", "gh"]
    assert list(cap_text_stream(docs, max_chars=5, doc_cap=2)) == ["ab", "gh", "k"]
    assert list(cap_text_stream(docs)) == docs


# ---------------------------------------------------------------------- chat rendering

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*3? <|assistant_end|>"},
    {"role": "assistant", "content": [
        {"type": "think", "text": "12 times 3"},
        {"type": "python", "text": "12*3"},
        {"type": "python_output", "text": "36"},
        {"type": "text", "text": "It is 36."},
    ]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def _expected_render(tok):
    """(ids, mask) spelled out span by span from the spec in dev/INTERFACES.md."""
    s, e = tok.encode_special, tok.encode
    spans = [
        ([s("<|bos|>")], 0),
        ([s("<|system_start|>")] + e("Be brief.") + [s("<|system_end|>")], 0),
        ([s("<|user_start|>")] + e("What is 12*3? <|assistant_end|>") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        ([s("<|think_start|>")] + e("12 times 3") + [s("<|think_end|>")], 1),
        ([s("<|python_start|>")] + e("12*3") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + e("36") + [s("<|output_end|>")], 0),
        (e("It is 36.") + [s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + e("Thanks!") + [s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (e("You're welcome.") + [s("<|assistant_end|>")], 1),
    ]
    ids = [i for tokens, _ in spans for i in tokens]
    mask = [m for tokens, m in spans for _ in tokens]
    return ids, mask


def test_render_conversation_ids_and_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    assert (ids, mask) == _expected_render(tok)
    # The trained tokens read back as exactly what the assistant wrote, tool output excluded.
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        "<|think_start|>12 times 3<|think_end|><|python_start|>12*3<|python_end|>It is 36.<|assistant_end|>"
        "You're welcome.<|assistant_end|>")
    assert tok.decode(ids).startswith("<|bos|><|system_start|>Be brief.<|system_end|><|user_start|>")
    # The user's literal "<|assistant_end|>" stays text: exactly two real assistant_end tokens.
    assert ids.count(tok.encode_special("<|assistant_end|>")) == 2


def test_render_without_system_and_plain_string(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ids, mask = tok.render_conversation(conv)
    s = tok.encode_special
    assert ids == [s("<|bos|>"), s("<|user_start|>")] + tok.encode("hi") + [s("<|user_end|>"),
                   s("<|assistant_start|>")] + tok.encode("hello") + [s("<|assistant_end|>")]
    assert mask == [0] * (len(ids) - len(tok.encode("hello")) - 1) + [1] * (len(tok.encode("hello")) + 1)


def test_render_truncation(tok):
    full_ids, full_mask = tok.render_conversation(CONVERSATION)
    for k in (1, 7, len(full_ids) - 1, len(full_ids), len(full_ids) + 10):
        ids, mask = tok.render_conversation(CONVERSATION, max_tokens=k)
        assert ids == full_ids[:k] and mask == full_mask[:k]
        assert len(ids) == len(mask) == min(k, len(full_ids))
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation(CONVERSATION, max_tokens=0)


def test_render_for_completion(tok):
    s = tok.encode_special
    prompt = tok.render_for_completion(CONVERSATION)
    assert prompt[-1] == s("<|assistant_start|>")
    full_ids, _ = tok.render_conversation(CONVERSATION)
    assert full_ids[: len(prompt)] == prompt  # the last assistant turn is dropped, everything before is kept
    assert len(full_ids) == len(prompt) + len(tok.encode("You're welcome.")) + 1
    ending_with_user = {"messages": CONVERSATION["messages"][:4]}
    assert tok.render_for_completion(ending_with_user) == prompt
    primed = tok.render_for_completion(ending_with_user, think=True)
    assert primed == prompt + [s("<|think_start|>")]


BAD_CONVERSATIONS = [
    (["not", "a", "dict"], "must be a dict with a 'messages' list"),
    ({"msgs": []}, "must be a dict with a 'messages' list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": ["hi"]}, "message 0: expected a dict with 'role' and 'content'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0: unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "message 0: expected role 'user', got 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "message 1: expected role 'assistant', got 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "message 1: a system message is only allowed as the first message"),
    ({"messages": [{"role": "system", "content": "only"}]}, "no user message"),
    ({"messages": [{"role": "user", "content": ""}]}, r"message 0 \(user\): content is empty"),
    ({"messages": [{"role": "system", "content": ["x"]}, {"role": "user", "content": "q"}]},
     r"message 0 \(system\): content must be a string, got list"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]},
     r"message 0 \(user\): content must be a string, got list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     r"message 1 \(assistant\): content is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": []}]},
     r"message 1 \(assistant\): content must be a non-empty string or a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
     "message 1 part 0: unknown part type 'image'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": 5}]}]},
     "message 1 part 0: text must be a string, got int"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "think", "text": ""}]}]},
     "message 1 part 1: 'think' part text is empty"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                     {"type": "python_output", "text": "1"}]}]},
     "message 1 part 1: a python_output part must directly follow a python part"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"text": "a"}]}]},
     "message 1 part 0: expected a dict with 'type' and 'text'"),
]


@pytest.mark.parametrize("conversation, message", BAD_CONVERSATIONS)
def test_bad_conversations_raise(tok, conversation, message):
    with pytest.raises(ValueError, match=message):
        tok.render_conversation(conversation)
    with pytest.raises(ValueError, match=message):
        tok.render_for_completion(conversation)


def test_empty_python_output_is_allowed(tok):
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "python", "text": "print()"}, {"type": "python_output", "text": ""}, {"type": "text", "text": "ok"}]}]}
    ids, mask = tok.render_conversation(conv)
    s = tok.encode_special
    start = ids.index(s("<|output_start|>"))
    assert ids[start + 1] == s("<|output_end|>") and mask[start] == mask[start + 1] == 0


# ---------------------------------------------------------------------- scripts


def _write_shards(data_dir, num_shards=3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(data_dir, exist_ok=True)
    for shard in range(num_shards):
        table = pa.table({"text": _corpus(num_docs=100, seed=10 + shard)})
        pq.write_table(table, os.path.join(data_dir, f"shard_{shard:05d}.parquet"))


def test_tok_train_and_eval_scripts(tmp_path, monkeypatch, capsys):
    from scripts import tok_eval, tok_train

    monkeypatch.setenv("REASONING_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("REASONING_DATA_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", ["tok_train"])
    with pytest.raises(UserError, match="base_data does not exist.*--synthetic"):
        tok_train.main()
    monkeypatch.setattr(sys, "argv", ["tok_train", "--vocab-size", "100"])
    with pytest.raises(UserError, match="--vocab-size 100: expected >= 269"):
        tok_train.main()

    _write_shards(tmp_path / "base_data")
    monkeypatch.setattr(sys, "argv", ["tok_train", "--vocab-size", "400", "--max-chars", "2e4", "--doc-cap", "500"])
    tok_train.main()
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("RESULT vocab_size=400 train_seconds=")
    assert "trained on 20,000 characters" in "\n".join(out)
    assert get_tokenizer(str(tmp_path)).vocab_size == 400

    monkeypatch.setattr(tok_eval, "reference_encodings", lambda: {"gpt2": None})  # never touch the network in tests
    monkeypatch.setattr(sys, "argv", ["tok_eval"])
    tok_eval.main()
    out = capsys.readouterr().out.strip().splitlines()
    assert "gpt2: skipped (offline)" in out
    result = dict(kv.split("=") for kv in out[-1].split()[1:])
    assert set(result) == {f"bytes_per_token_{k}" for k in ("prose", "math", "code", "val")}
    assert float(result["bytes_per_token_val"]) > 1.5  # in-distribution text compresses well even at vocab 400


def test_training_progress_bar_counts_characters_and_changes_nothing(capsys):
    docs = _corpus(num_docs=60, seed=3)
    quiet = train_tokenizer(iter(docs), 300)
    assert capsys.readouterr().err == ""
    chars = sum(len(d) for d in docs)
    shown = train_tokenizer(iter(docs), 300, progress=True, total_chars=10 * chars)  # the corpus ends first
    assert shown.mergeable_ranks == quiet.mergeable_ranks
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("tokenizer: reading text: 100%") and f"{chars / 1000:.1f}k/{chars / 1000:.1f}k" in last, last


def test_tok_eval_rejects_a_data_dir_without_a_corpus(tmp_path, monkeypatch, capsys):
    from reasoning.common import run_main
    from scripts import tok_eval

    monkeypatch.setenv("REASONING_BASE_DIR", str(tmp_path))  # no tokenizer either: the flag is checked first
    monkeypatch.delenv("REASONING_DATA_DIR", raising=False)
    missing, empty = str(tmp_path / "missing"), str(tmp_path / "empty")
    os.makedirs(empty)
    for argv, message in ((["--data-dir", missing], f"--data-dir {missing}: no such folder"),
                          (["--data-dir", empty], f"--data-dir {empty}: data dir {empty} has no .parquet shards")):
        monkeypatch.setattr(sys, "argv", ["tok_eval", *argv])
        with pytest.raises(SystemExit) as exc:
            run_main(tok_eval.main)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err
    monkeypatch.setenv("REASONING_DATA_DIR", missing)  # naming the folder through the environment counts too
    monkeypatch.setattr(sys, "argv", ["tok_eval"])
    with pytest.raises(UserError, match=f"REASONING_DATA_DIR={missing}: no such folder"):
        tok_eval.main()
