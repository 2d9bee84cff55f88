"""The pretraining corpus: a directory of parquet shards with a `text` column.

The shards come from one of three places behind one interface: downloaded from the HF hub by URL pattern
(FineWeb-Edu style, `python -m scripts.base_data -n N`), any local directory (`--data-dir` /
`$REASONING_DATA_DIR`), or the offline synthetic corpus (`python -m scripts.base_data --synthetic`).
The last shard by name is the validation split, every other shard is train.

Reading is by parquet row group, the unit the dataloader resumes from: global row group number i (counting
through the split's shards in order) belongs to rank i mod world_size, so ranks read disjoint data and a
position is just (shard index, row group index).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import urllib.error
import urllib.request
from typing import Callable, Iterator

import pyarrow.parquet as pq

from reasoning.common import UserError, atomic_write, get_base_dir

# nanochat's re-shuffled FineWeb-Edu: shards 00000..01822, ~100 MB each; the last one serves as validation.
DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
DEFAULT_PATTERN = "shard_{index:05d}.parquet"
DEFAULT_MAX_SHARD = 1822
TEXT_COLUMN = "text"
DATA_DIR_ENV = "REASONING_DATA_DIR"
_CHUNK = 1 << 20  # download read size


# ----------------------------------------------------------------------------------------------------------------
# Locating and reading shards

def resolve_data_dir(arg: str | None = None) -> str:
    """The corpus folder: the explicit argument, else $REASONING_DATA_DIR, else <base>/base_data."""
    chosen = arg or os.environ.get(DATA_DIR_ENV) or os.path.join(get_base_dir(), "base_data")
    return os.path.abspath(os.path.expanduser(chosen))


def list_shards(data_dir: str) -> list[str]:
    """All parquet shards in `data_dir`, sorted by name (full paths)."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data dir {data_dir} does not exist; download shards (python -m scripts.base_data -n N), "
                        f"write the offline corpus (--synthetic) or pass --data-dir DIR")
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet"))
    if not names:
        raise UserError(f"data dir {data_dir} has no .parquet shards; download some (python -m scripts.base_data "
                        f"-n N), write the offline corpus (--synthetic) or pass --data-dir DIR")
    return [os.path.join(data_dir, n) for n in names]


def split_shards(data_dir: str) -> tuple[list[str], list[str]]:
    """(train shards, [val shard]): the last shard by name is validation, the rest train."""
    shards = list_shards(data_dir)
    if len(shards) < 2:
        raise UserError(f"data dir {data_dir} has only {len(shards)} parquet shard; need at least 2 "
                        f"(the last by name is the validation split, the rest train)")
    return shards[:-1], shards[-1:]


def _open_shard(path: str) -> pq.ParquetFile:
    """Open a shard and check it has a text column; anything else is the user's data problem, named by file."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for truncated / non-parquet files
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if TEXT_COLUMN not in pf.schema_arrow.names:
        raise UserError(f"{path}: no {TEXT_COLUMN!r} column (columns: {pf.schema_arrow.names})")
    return pf


class ShardSet:
    """The shards of one split, with their row group counts: enough to map positions to ranks and read them."""

    def __init__(self, paths: list[str]):
        if not paths:
            raise ValueError("ShardSet needs at least one shard path")
        self.paths = list(paths)
        self.row_groups = [_open_shard(p).metadata.num_row_groups for p in self.paths]
        # global row group number of each shard's first row group: decides which rank owns a row group
        self._first_global = [0]
        for n in self.row_groups:
            self._first_global.append(self._first_global[-1] + n)
        self._open: tuple[int, pq.ParquetFile] | None = None

    @property
    def total_row_groups(self) -> int:
        return self._first_global[-1]

    def owned_row_groups(self, rank: int, world_size: int) -> int:
        """How many row groups `rank` reads per pass."""
        _check_rank(rank, world_size)
        return max(0, (self.total_row_groups - rank + world_size - 1) // world_size)

    def read(self, shard: int, row_group: int) -> list[str]:
        """Texts of one row group (nulls read as empty strings)."""
        if self._open is None or self._open[0] != shard:
            self._open = (shard, _open_shard(self.paths[shard]))
        try:
            table = self._open[1].read_row_group(row_group, columns=[TEXT_COLUMN])
        except Exception as e:
            raise UserError(f"{self.paths[shard]}: row group {row_group} is unreadable "
                            f"({type(e).__name__}: {e})") from None
        return [t if t is not None else "" for t in table.column(TEXT_COLUMN).to_pylist()]

    def iter_row_groups(self, rank: int = 0, world_size: int = 1,
                        start: tuple[int, int] | None = None) -> Iterator[tuple[int, int, list[str]]]:
        """One pass over this rank's row groups from position `start` = (shard, row group), inclusive if owned.

        Yields (shard index, row group index, texts). A start past a shard's last row group moves to the next shard.
        """
        _check_rank(rank, world_size)
        shard0, group0 = start if start is not None else (0, 0)
        for shard in range(shard0, len(self.paths)):
            first = group0 if shard == shard0 else 0
            # first owned row group at or after `first`: global number ≡ rank (mod world_size)
            first += (rank - (self._first_global[shard] + first)) % world_size
            for group in range(first, self.row_groups[shard], world_size):
                yield shard, group, self.read(shard, group)


def write_shard(path: str, texts: list[str], row_group_size: int = 1024):
    """Write texts as a parquet shard in the layout this module reads (atomically: temp file, then rename)."""
    import pyarrow as pa
    table = pa.table({TEXT_COLUMN: pa.array(texts, type=pa.string())})
    atomic_write(path, lambda f: pq.write_table(table, f, row_group_size=row_group_size))


def _check_rank(rank: int, world_size: int):
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def open_split(data_dir: str | None = None, split: str = "train") -> ShardSet:
    """The ShardSet of `split` ("train" | "val") in the resolved data dir."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = split_shards(resolve_data_dir(data_dir))
    return ShardSet(train if split == "train" else val)


def iter_row_groups(data_dir: str | None = None, split: str = "train", rank: int = 0, world_size: int = 1,
                    start: tuple[int, int] | None = None) -> Iterator[tuple[int, int, list[str]]]:
    """One DDP-aware pass over a split by row group: (shard index, row group index, texts)."""
    return open_split(data_dir, split).iter_row_groups(rank, world_size, start)


def iter_documents(data_dir: str | None = None, split: str = "train", rank: int = 0, world_size: int = 1,
                   start: tuple[int, int] | None = None) -> Iterator[str]:
    """One pass over the documents of a split (this rank's share), e.g. for tokenizer training."""
    for _shard, _group, texts in iter_row_groups(data_dir, split, rank, world_size, start):
        yield from texts


# ----------------------------------------------------------------------------------------------------------------
# Downloading

def _offline_hint() -> str:
    return (f"pass --data-dir DIR (or set ${DATA_DIR_ENV}) to use local parquet shards, "
            f"or --synthetic to write the offline corpus")


def shard_url(index: int, base_url: str = DEFAULT_BASE_URL, pattern: str = DEFAULT_PATTERN) -> str:
    return base_url.rstrip("/") + "/" + pattern.format(index=index)


def _check_downloaded(path: str, expected_size: int | None):
    """A download counts only if it has the advertised size and pyarrow can read it as a text shard."""
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        raise OSError(f"got {size} bytes, expected {expected_size}")
    pf = pq.ParquetFile(path)
    if TEXT_COLUMN not in pf.schema_arrow.names:
        raise OSError(f"no {TEXT_COLUMN!r} column (columns: {pf.schema_arrow.names})")


def _retryable_http(code: int) -> bool:
    return code >= 500 or code in (408, 429)


def download_shard(index: int, data_dir: str, base_url: str = DEFAULT_BASE_URL, pattern: str = DEFAULT_PATTERN,
                   retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
                   stop: threading.Event | None = None, on_bytes: Callable[[int], None] | None = None) -> str:
    """Fetch one shard into `data_dir` (skipped if present) and return its path.

    Streamed into a temp file (common.atomic_write) that replaces `<name>` only after the size and parquet
    checks pass, so an interrupted or corrupt download never leaves a file that looks like a shard. Retries
    with exponential backoff (backoff, 2·backoff, ...); raises UserError after the last attempt.
    `on_bytes(n)` hears of every chunk written, and of -(bytes of an attempt) when that attempt is thrown away,
    so a progress bar counts only what ends up on disk.
    """
    url = shard_url(index, base_url, pattern)
    stop = stop or threading.Event()
    path = os.path.join(data_dir, os.path.basename(pattern.format(index=index)))
    if os.path.exists(path):
        return path

    written = 0  # bytes of the current attempt reported to on_bytes

    def fetch_and_check(f):  # raising here makes atomic_write drop the temp file and leave `path` absent
        nonlocal written
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length") if response.headers is not None else None
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                written += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        f.flush()
        _check_downloaded(f.name, int(length) if length else None)

    last_error = "no attempt made"
    unreachable = False
    for attempt in range(retries):
        if stop.is_set():
            raise UserError(f"download of {url} cancelled after another shard failed")
        written = 0
        try:
            atomic_write(path, fetch_and_check)
            return path
        except urllib.error.HTTPError as e:
            last_error, unreachable = f"HTTP {e.code} {e.reason}", False
            if not _retryable_http(e.code):
                raise UserError(f"{url}: HTTP {e.code} {e.reason}; check --base-url, --pattern and --max-shard") \
                    from None
        except urllib.error.URLError as e:  # DNS failure, refused connection, no route: the network is the problem
            last_error, unreachable = str(e.reason), True
        except Exception as e:  # timeout, reset, truncated body, size mismatch, unreadable parquet: try again
            last_error, unreachable = f"{type(e).__name__}: {e}", False
        if written and on_bytes is not None:  # this attempt's bytes were thrown away
            on_bytes(-written)
        # An unreachable network gets one retry (a DNS blip), not the full backoff ladder: offline machines
        # should hear "pass --data-dir" within a second or two, in one line.
        if attempt + 1 >= (min(retries, 2) if unreachable else retries):
            break
        delay = backoff * 2 ** attempt
        if not unreachable:
            print(f"{os.path.basename(path)}: attempt {attempt + 1}/{retries} failed ({last_error}); "
                  f"retrying in {delay:.0f}s", file=sys.stderr, flush=True)
        stop.wait(delay)  # an Event wait, so a failure elsewhere cancels this backoff at once
    if unreachable:
        raise UserError(f"network unreachable: cannot download {url} ({last_error}); {_offline_hint()}")
    raise UserError(f"{url}: download failed after {attempt + 1} attempts ({last_error})")


def download_shards(indices: list[int], data_dir: str, workers: int = 4, progress: bool = False,
                    **kwargs) -> list[str]:
    """Download several shards in parallel threads (I/O bound); the first failure cancels the rest.

    progress=True shows a tqdm bar on stderr when it is a terminal: bytes written, rate, and shards done (a shard
    is ~100 MB, so a per-shard count alone would sit still for minutes). Otherwise (no progress, or stderr going
    to a log file, as with speedrun.sh's background download) each finished shard prints one line.
    """
    os.makedirs(data_dir, exist_ok=True)
    stop = threading.Event()
    paths = []
    bar, bar_lock = None, threading.Lock()
    if progress:
        from tqdm import tqdm

        # disable=None: off when stderr is not a terminal; delay: a download that fails at once (offline) prints
        # its one-line error and no empty bar
        bar = tqdm(desc="download", unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, delay=0.5,
                   postfix=f"shards=0/{len(indices)}", disable=None)
        if bar.disable:
            bar = None

    def on_bytes(n: int):
        with bar_lock:  # tqdm's counter is not thread-safe
            bar.update(n)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            report = on_bytes if bar is not None else None
            futures = [pool.submit(download_shard, i, data_dir, stop=stop, on_bytes=report, **kwargs) for i in indices]
            try:
                for future in concurrent.futures.as_completed(futures):
                    paths.append(future.result())
                    if bar is None:
                        print(f"ready: {os.path.basename(paths[-1])} ({len(paths)}/{len(indices)})", flush=True)
                    else:
                        with bar_lock:
                            bar.set_postfix_str(f"shards={len(paths)}/{len(indices)}")
            except BaseException:
                stop.set()
                for f in futures:
                    f.cancel()
                raise
    finally:  # after the pool has shut down: no thread reports bytes any more
        if bar is not None:
            bar.close()
    return sorted(paths)


def download_indices(num_shards: int, max_shard: int = DEFAULT_MAX_SHARD) -> list[int]:
    """Train shards 0..num_shards-1 (-1: all) plus the last shard, which is the validation split."""
    if num_shards == -1:
        num_shards = max_shard
    if not 0 <= num_shards <= max_shard:
        raise UserError(f"-n {num_shards}: expected 0..{max_shard} train shards (or -1 for all)")
    return list(range(num_shards)) + [max_shard]
