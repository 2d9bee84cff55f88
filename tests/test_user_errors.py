"""Bad data files are one-line errors naming the file (issue 17, item 5): invalid UTF-8 and absurdly nested JSON in
every JSONL reader, garbage tokenizer files (ours and Hugging Face's). The scripts print a UserError as one line
(reasoning.common.run_main); the last test checks that end to end through a real script."""

import base64
import json
import os
import subprocess
import sys

import pytest

from reasoning.common import UserError, read_jsonl
from reasoning.hf_tokenizer import HFTokenizer
from reasoning.tokenizer import Tokenizer
from tasks.customjson import CustomJSON
from tasks.sources import read_records

GOOD_LINE = json.dumps({"problem": "2+3?", "thinking": "2+3=5", "answer": "5"}) + "\n"
DEEP = "[" * 100_000 + "]" * 100_000  # json's C decoder raises RecursionError long before this depth


def _one_line_user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# ---------------------------------------------------------------------------------------------- JSONL data

def test_invalid_utf8_in_customjson_names_file_and_line(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b'{"problem": "caf\xe9 \xff", "answer": "5"}\n' + GOOD_LINE.encode())
    message = _one_line_user_error(CustomJSON, str(path))
    assert f"{path}:2:" in message and "UTF-8" in message


def test_customjson_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text(GOOD_LINE + "\n\n" + '{"problem": 5}\n')
    assert f"{path}:4:" in _one_line_user_error(CustomJSON, str(path))
    path.write_text(GOOD_LINE + "\n" + GOOD_LINE)
    assert [e["id"] for e in CustomJSON(str(path))] == ["traces.jsonl:1", "traces.jsonl:3"]


@pytest.mark.parametrize("reader", [CustomJSON, read_records, read_jsonl])
def test_deeply_nested_json_line_is_a_user_error(tmp_path, reader):
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD_LINE + DEEP + "\n")
    message = _one_line_user_error(reader, str(path))
    assert f"{path}:2:" in message and "nested too deeply" in message


def test_deeply_nested_json_file_is_a_user_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(DEEP)
    assert "nested too deeply" in _one_line_user_error(read_records, str(path))
    path.write_bytes(b'[{"a": "\xff"}]')
    assert "UTF-8" in _one_line_user_error(read_records, str(path))


def test_predictions_file_stops_at_a_damaged_line(tmp_path):
    """Our own predictions file: a damaged line is torn, the problems from there on are generated again."""
    path = tmp_path / "predictions.jsonl"
    good = json.dumps({"problem_index": 0}) + "\n"
    for damaged in (DEEP.encode() + b"\n", b'{"a": "\xff"}\n', b"{not json\n", b"[1]\n", b'{"cut": '):
        path.write_bytes(good.encode() + damaged + good.encode())
        assert read_jsonl(str(path), stop_at_torn_line=True) == [{"problem_index": 0}]


# ---------------------------------------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    ranks = {bytes([i]): i for i in range(256)}
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    Tokenizer(ranks, special_tokens=["<|bos|>"]).save(directory)
    return directory


def _damaged_copy(src: str, dst, name: str, content: bytes) -> str:
    for file in os.listdir(src):
        data = content if file == name else open(os.path.join(src, file), "rb").read()
        (dst / file).write_bytes(data)
    return str(dst)


GARBAGE_RANKS = {
    "random bytes": bytes(range(256)) * 4,
    "one field": b"QQ==\n",
    "bad base64": b"!!!! 0\n",
    "rank not an integer": b"QQ== zero\n",
    "duplicate token": b"QQ== 0\nQQ== 1\n",
    "ranks with a gap": b"".join(base64.b64encode(bytes([i])) + b" %d\n" % (i * 2) for i in range(256)),
}


@pytest.mark.parametrize("case", list(GARBAGE_RANKS))
def test_garbage_tiktoken_file_is_a_user_error(tokenizer_dir, tmp_path, case):
    directory = _damaged_copy(tokenizer_dir, tmp_path, "tokenizer.tiktoken", GARBAGE_RANKS[case])
    message = _one_line_user_error(Tokenizer.load, directory)
    assert "tokenizer.tiktoken" in message


GARBAGE_META = {
    "random bytes": bytes(range(256)),
    "not JSON": b"{format: v1",
    "nested too deeply": DEEP.encode(),
    "a list": b"[1, 2]",
    "vocab size a string": None,  # filled from the real file below
    "pattern a number": None,
    "special tokens not strings": None,
}


@pytest.mark.parametrize("case", list(GARBAGE_META))
def test_garbage_tokenizer_json_is_a_user_error(tokenizer_dir, tmp_path, case):
    content = GARBAGE_META[case]
    if content is None:
        meta = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json")))
        key, value = {"vocab size a string": ("bpe_vocab_size", "256"), "pattern a number": ("pattern", 5),
                      "special tokens not strings": ("special_tokens", [1, 2])}[case]
        content = json.dumps(dict(meta, **{key: value})).encode()
    directory = _damaged_copy(tokenizer_dir, tmp_path, "tokenizer.json", content)
    message = _one_line_user_error(Tokenizer.load, directory)
    assert "tokenizer.json" in message and "expected" in message


def test_tokenizer_pattern_that_does_not_compile_is_a_user_error(tokenizer_dir, tmp_path):
    meta = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json")))
    directory = _damaged_copy(tokenizer_dir, tmp_path, "tokenizer.json", json.dumps(dict(meta, pattern="(")).encode())
    assert directory in _one_line_user_error(Tokenizer.load, directory)


def test_intact_tokenizer_still_loads(tokenizer_dir):
    assert Tokenizer.load(tokenizer_dir).decode(Tokenizer.load(tokenizer_dir).encode("hello")) == "hello"


@pytest.mark.parametrize("content", [bytes(range(256)), b"{}", DEEP.encode(), b'{"model": 5}'])
def test_garbage_hf_tokenizer_json_is_a_user_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    message = _one_line_user_error(HFTokenizer.load, str(tmp_path))
    assert "tokenizer.json" in message


def test_script_prints_garbage_tokenizer_as_one_line(tokenizer_dir, tmp_path):
    """The real script: exit code 2, one `error:` line on stderr that names the file, no traceback."""
    base = tmp_path / "base"
    (base / "tokenizer").mkdir(parents=True)
    _damaged_copy(tokenizer_dir, base / "tokenizer", "tokenizer.tiktoken", GARBAGE_RANKS["random bytes"])
    env = dict(os.environ, REASONING_BASE_DIR=str(base))
    result = subprocess.run([sys.executable, "-m", "scripts.tok_eval"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "tokenizer.tiktoken" in lines[0]
