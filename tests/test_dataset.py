"""Corpus shards: locating, splitting, DDP row-group assignment, resumable reading, bad shards, downloads."""

import io
import os
import sys
import time
import urllib.error

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reasoning import dataset
from scripts import base_data
from scripts.base_data import main as base_data_main
from reasoning.common import UserError, run_main
from reasoning.dataset import (ShardSet, iter_documents, iter_row_groups, list_shards, resolve_data_dir, split_shards,
                               write_shard)

# row groups per shard: 3, 2, 3 (val) — uneven, so the round-robin has to carry across shard boundaries
SHARD_DOCS = [10, 8, 9]
ROW_GROUP = 4


@pytest.fixture
def corpus(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    texts = []
    for s, n in enumerate(SHARD_DOCS):
        docs = [f"shard {s} doc {i}" for i in range(n)]
        write_shard(str(data_dir / f"shard_{s:05d}.parquet"), docs, row_group_size=ROW_GROUP)
        texts.append(docs)
    return str(data_dir), texts


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("REASONING_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("REASONING_DATA_DIR", raising=False)
    assert resolve_data_dir() == str(tmp_path / "base" / "base_data")
    monkeypatch.setenv("REASONING_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == str(tmp_path / "env")
    assert resolve_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")


def test_list_and_split_shards(corpus):
    data_dir, _ = corpus
    # leftovers of an interrupted download and unrelated files are not shards
    open(os.path.join(data_dir, "shard_00009.parquet.tmp"), "wb").write(b"partial")
    open(os.path.join(data_dir, ".shard_00010.parquet.1a2b3c4d.tmp"), "wb").write(b"partial")  # atomic_write's
    open(os.path.join(data_dir, "README.md"), "w").write("hi")
    shards = list_shards(data_dir)
    assert [os.path.basename(p) for p in shards] == [f"shard_{i:05d}.parquet" for i in range(3)]
    train, val = split_shards(data_dir)
    assert train == shards[:2] and val == shards[2:]


def test_missing_empty_and_single_shard_dirs_name_the_dir(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match="nope"):
        list_shards(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"empty.*no \.parquet"):
        list_shards(str(empty))
    write_shard(str(empty / "only.parquet"), ["a"])
    with pytest.raises(UserError, match="at least 2"):
        split_shards(str(empty))


def test_iter_documents_reads_each_split_in_order(corpus):
    data_dir, texts = corpus
    assert list(iter_documents(data_dir, "train")) == texts[0] + texts[1]
    assert list(iter_documents(data_dir, "val")) == texts[2]
    with pytest.raises(ValueError, match="split"):
        list(iter_documents(data_dir, "test"))


def _all_row_groups(doc_counts):
    """Reference: (shard, row group) in global order for shards holding these document counts."""
    return [(s, g) for s, n in enumerate(doc_counts) for g in range((n + ROW_GROUP - 1) // ROW_GROUP)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_row_groups_round_robin_across_ranks(corpus, world_size):
    data_dir, texts = corpus
    reference = _all_row_groups(SHARD_DOCS[:2])  # train: 3 + 2 row groups
    seen = []
    for rank in range(world_size):
        got = [(s, g) for s, g, _ in iter_row_groups(data_dir, "train", rank, world_size)]
        assert got == reference[rank::world_size]  # global row group i belongs to rank i mod W
        seen += got
    assert sorted(seen) == reference  # disjoint and complete
    # the texts are the row group's rows
    for s, g, batch in iter_row_groups(data_dir, "train", 0, world_size):
        assert batch == texts[s][g * ROW_GROUP:(g + 1) * ROW_GROUP]


@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 2), (1, 2)])
def test_start_position_resumes_the_pass(corpus, rank, world_size):
    data_dir, _ = corpus
    full = [(s, g) for s, g, _ in iter_row_groups(data_dir, "train", rank, world_size)]
    reference = _all_row_groups(SHARD_DOCS[:2])
    # every position (including one past a shard's last row group) continues with this rank's remaining groups
    for s in range(2):
        for g in range(4):
            expected = [p for p in full if p >= (s, g)]
            got = [(a, b) for a, b, _ in iter_row_groups(data_dir, "train", rank, world_size, start=(s, g))]
            assert got == expected, (s, g)
    assert set(full) <= set(reference)


def test_bad_rank_is_a_value_error(corpus):
    with pytest.raises(ValueError, match="rank"):
        list(iter_row_groups(corpus[0], "train", rank=2, world_size=2))


def test_corrupt_shard_names_the_file(corpus):
    data_dir, _ = corpus
    bad = os.path.join(data_dir, "shard_00001.parquet")
    with open(bad, "wb") as f:
        f.write(b"PAR1 this is not parquet at all")
    with pytest.raises(UserError, match="shard_00001.parquet.*not a readable parquet"):
        list(iter_documents(data_dir, "train"))


def test_truncated_shard_names_the_file(corpus):
    data_dir, _ = corpus
    path = os.path.join(data_dir, "shard_00000.parquet")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="shard_00000.parquet"):
        ShardSet(split_shards(data_dir)[0])


def test_shard_without_text_column_names_the_file(corpus):
    data_dir, _ = corpus
    path = os.path.join(data_dir, "shard_00001.parquet")
    pq.write_table(pa.table({"content": ["x", "y"]}), path)
    with pytest.raises(UserError, match=r"shard_00001.parquet: no 'text' column.*content"):
        list(iter_documents(data_dir, "train"))


# ---- downloads (urlopen is replaced; no network is touched) -------------------------------------------------------

class FakeResponse(io.BytesIO):
    """What urlopen returns: a readable body with headers; can fail after `fail_after` bytes."""

    def __init__(self, body: bytes, fail_after: int | None = None, content_length: int | None = None):
        super().__init__(body)
        self.fail_after = fail_after
        self.headers = {"Content-Length": str(len(body) if content_length is None else content_length)}

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(n if self.fail_after is None else min(n, self.fail_after - self.tell()))


def _shard_bytes(tmp_path, name, texts):
    path = str(tmp_path / name)
    write_shard(path, texts, row_group_size=2)
    return open(path, "rb").read()


def test_offline_download_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    calls = []

    def offline(url, timeout=None):
        calls.append(url)
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(dataset.urllib.request, "urlopen", offline)
    target = tmp_path / "dl"
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: base_data_main(["-n", "2", "--data-dir", str(target), "--backoff", "0", "--retries", "5"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "network unreachable" in err[0]
    assert "--data-dir" in err[0] and "REASONING_DATA_DIR" in err[0] and "--synthetic" in err[0]
    assert os.listdir(target) == []  # no partial or temp files
    # an unreachable network is retried once per shard, not through the whole backoff ladder
    assert 1 <= len(calls) <= 2 * 3


def test_download_gets_train_and_val_shards_and_skips_present_ones(tmp_path, monkeypatch):
    bodies = {i: _shard_bytes(tmp_path, f"src{i}.parquet", [f"doc {i}.{j}" for j in range(3)]) for i in (0, 1, 7)}
    urls = []

    def serve(url, timeout=None):
        urls.append(url)
        index = int(url.rsplit("_", 1)[1].split(".")[0])
        return FakeResponse(bodies[index])

    monkeypatch.setattr(dataset.urllib.request, "urlopen", serve)
    target = str(tmp_path / "dl")
    base_data_main(["-n", "2", "--data-dir", target, "--max-shard", "7", "--base-url", "https://example.org/x/",
                  "--workers", "3"])
    assert sorted(urls) == [f"https://example.org/x/shard_{i:05d}.parquet" for i in (0, 1, 7)]
    train, val = split_shards(target)
    assert [os.path.basename(p) for p in val] == ["shard_00007.parquet"]  # the val shard sorts last
    assert list(iter_documents(target, "val")) == ["doc 7.0", "doc 7.1", "doc 7.2"]
    assert sorted(os.listdir(target)) == [f"shard_{i:05d}.parquet" for i in (0, 1, 7)]
    urls.clear()
    base_data_main(["-n", "2", "--data-dir", target, "--max-shard", "7"])
    assert urls == []  # everything already there


def test_interrupted_download_is_retried_and_never_left_partial(tmp_path, monkeypatch):
    body = _shard_bytes(tmp_path, "src.parquet", ["a", "b", "c"])
    attempts = []

    def flaky(url, timeout=None):
        attempts.append(url)
        # first attempt: connection drops halfway; second: a server error; third: fine
        if len(attempts) == 1:
            return FakeResponse(body, fail_after=len(body) // 2)
        if len(attempts) == 2:
            raise urllib.error.HTTPError(url, 503, "Service Unavailable", {}, None)
        return FakeResponse(body)

    monkeypatch.setattr(dataset.urllib.request, "urlopen", flaky)
    target = tmp_path / "dl"
    target.mkdir()
    path = dataset.download_shard(3, str(target), retries=3, backoff=0)
    assert len(attempts) == 3
    assert open(path, "rb").read() == body
    assert os.listdir(target) == ["shard_00003.parquet"]  # no temp file of the failed attempts is left


def test_progress_counts_only_the_bytes_that_stay(tmp_path, monkeypatch):
    """on_bytes (what the download bar shows) takes back the bytes of an attempt that was thrown away."""
    body = _shard_bytes(tmp_path, "src.parquet", ["a", "b", "c"])
    attempts = []

    def flaky(url, timeout=None):
        attempts.append(url)
        return FakeResponse(body, fail_after=len(body) // 2) if len(attempts) == 1 else FakeResponse(body)

    monkeypatch.setattr(dataset.urllib.request, "urlopen", flaky)
    reported = []
    (tmp_path / "dl").mkdir()
    dataset.download_shard(0, str(tmp_path / "dl"), retries=2, backoff=0, on_bytes=reported.append)
    assert len(attempts) == 2
    assert reported[0] > 0 and -sum(n for n in reported if n > 0) < min(reported) < 0  # one roll-back
    assert sum(reported) == len(body)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_download_shows_a_byte_bar_on_a_terminal_and_lines_otherwise(tmp_path, monkeypatch, capsys):
    from tqdm import tqdm

    bodies = {i: _shard_bytes(tmp_path, f"src{i}.parquet", [f"doc {i}.{j}" for j in range(40)]) for i in (0, 1, 7)}

    def slow(url, timeout=None):
        time.sleep(0.3)  # the bar appears only for downloads that last (tqdm delay), as real ones do
        return FakeResponse(bodies[int(url.rsplit("_", 1)[1].split(".")[0])])

    monkeypatch.setattr(dataset.urllib.request, "urlopen", slow)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    dataset.download_shards([0, 1, 7], str(tmp_path / "tty"), workers=1, progress=True)
    shown = terminal.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    total = sum(len(b) for b in bodies.values())
    assert shown.startswith("download: ") and "shards=3/3" in shown
    assert tqdm.format_sizeof(total, "B", 1024) in shown, (shown, total)
    assert "ready:" not in capsys.readouterr().out

    monkeypatch.setattr(dataset.urllib.request, "urlopen",
                        lambda url, timeout=None: FakeResponse(bodies[int(url.rsplit("_", 1)[1].split(".")[0])]))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: one line per shard instead of a bar
    dataset.download_shards([0, 7], str(tmp_path / "log"), workers=1, progress=True)
    assert sys.stderr.getvalue() == ""
    out = capsys.readouterr().out.splitlines()
    assert out == ["ready: shard_00000.parquet (1/2)", "ready: shard_00007.parquet (2/2)"]


@pytest.mark.parametrize("response", ["truncated", "garbage", "reset"])
def test_failed_download_leaves_no_file(tmp_path, monkeypatch, response):
    body = _shard_bytes(tmp_path, "src.parquet", ["a", "b", "c"])
    responses = {
        "truncated": lambda: FakeResponse(body[:-10], content_length=len(body)),  # short read: size check
        "garbage": lambda: FakeResponse(b"<html>rate limited</html>"),  # right size, not parquet
        "reset": lambda: FakeResponse(body, fail_after=100),
    }
    attempts = []
    monkeypatch.setattr(dataset.urllib.request, "urlopen",
                        lambda url, timeout=None: attempts.append(url) or responses[response]())
    target = tmp_path / "dl"
    target.mkdir()
    with pytest.raises(UserError, match=r"shard_00000.parquet: download failed after 3 attempts"):
        dataset.download_shard(0, str(target), retries=3, backoff=0)
    assert len(attempts) == 3
    assert os.listdir(target) == []


def test_http_404_is_not_retried(tmp_path, monkeypatch):
    attempts = []

    def not_found(url, timeout=None):
        attempts.append(url)
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(dataset.urllib.request, "urlopen", not_found)
    with pytest.raises(UserError, match="HTTP 404.*--max-shard"):
        dataset.download_shard(5, str(tmp_path), retries=4, backoff=0)
    assert len(attempts) == 1 and os.listdir(tmp_path) == []


def test_bad_shard_count_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="-n 5000"):
        base_data_main(["-n", "5000", "--data-dir", str(tmp_path)])


# ---- offline synthetic corpus ----------------------------------------------------------------------------------

def test_synthetic_flag_calls_the_corpus_writer(tmp_path, monkeypatch):
    calls = []

    def fake_writer(out_dir, num_shards, docs_per_shard, seed):
        calls.append((out_dir, num_shards, docs_per_shard, seed))
        for s in range(num_shards):
            write_shard(os.path.join(out_dir, f"synth_{s:03d}.parquet"), [f"{s}-{d}" for d in range(docs_per_shard)])

    monkeypatch.setattr(base_data, "write_synthetic_corpus", fake_writer)
    target = str(tmp_path / "synth")
    base_data_main(["--synthetic", "--data-dir", target, "--num-shards", "3", "--docs-per-shard", "4", "--seed", "7"])
    assert calls == [(target, 3, 4, 7)]
    assert list(iter_documents(target, "val")) == ["2-0", "2-1", "2-2", "2-3"]


def test_real_synthetic_corpus_is_readable(tmp_path):
    target = str(tmp_path / "synth")
    base_data_main(["--synthetic", "--data-dir", target, "--num-shards", "2", "--docs-per-shard", "5"])
    train, val = split_shards(target)
    assert len(train) == 1 and len(val) == 1
    docs = list(iter_documents(target, "train"))
    assert len(docs) == 5 and all(isinstance(d, str) and d for d in docs)


def test_module_entry_point_reports_bad_flags_in_one_line(tmp_path):
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "scripts.base_data", "--synthetic", "--num-shards", "1",
                             "--data-dir", str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --num-shards 1 --docs-per-shard 2000: expected at least 2 shards (one is validation) "
        "and 1 document per shard"]
