"""Where a task's rows come from: a local file (JSON, JSONL or parquet) or the Hugging Face hub.

Data sources, first match wins (DESIGN.md: "no hidden downloads", "offline default"):
  1. `data_path` (the scripts' `--data-path`, or a task's own `@PATH`): a file is read as is; a folder is searched
     for the task's conventional file names (e.g. `gsm8k_train.jsonl`, `math500_test.json`);
  2. `$REASONING_TASK_DATA_DIR`, searched the same way (a folder without those files falls through);
  3. the Hugging Face hub through `datasets`. Offline, this fails at once with one line naming `--data-path`
     (the hub's own client would retry for ~30 s first).
The task modules call `load_rows`; tasks/registry.py maps names to those modules.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from reasoning.common import UserError, parse_json, read_jsonl
from reasoning.distributed import node_leader_first

# task files only; the pretraining corpus has its own $REASONING_DATA_DIR (reasoning/dataset.py)
DATA_DIR_ENV = "REASONING_TASK_DATA_DIR"
DATA_FLAG = "--data-path"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class ArrowRows:
    """Rows of a parquet file, read lazily (memory-mapped) so a large SFT set costs no RAM up front."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        try:
            self.table = pq.read_table(path, memory_map=True)
        except Exception as e:  # pyarrow raises several types for truncated / non-parquet files
            raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
        self.path = path

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict:
        return self.table.slice(index, 1).to_pylist()[0]


def read_records(path: str):
    """A local data file as an indexable sequence of dicts (list, or ArrowRows for parquet)."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist")
    if path.endswith(".parquet"):
        return ArrowRows(path)
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    if path.endswith(".json"):
        with open(path, "rb") as f:
            data = parse_json(f.read(), path)
        if isinstance(data, dict):  # {"rows": [...]} / {"data": [...]} style wrappers: take the one list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise UserError(f"{path}: expected a JSON list of objects")
        return data
    raise UserError(f"data file {path}: unknown format, expected one of {', '.join(LOCAL_SUFFIXES)}")


def find_local_file(task_name: str, data_path: str | None, filenames: list[str]) -> str | None:
    """The local file to read for a task, or None to fall back to the hub. See the module docstring."""
    if data_path:
        path = os.path.abspath(os.path.expanduser(data_path))
        if os.path.isfile(path):
            return path
        if not os.path.isdir(path):
            raise UserError(f"{DATA_FLAG} {data_path}: no such file or folder")
        found = _search_dir(path, filenames)
        if found is None:
            raise UserError(f"{DATA_FLAG} {data_path}: folder has none of the {task_name} files "
                            f"{', '.join(filenames)}")
        return found
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir and os.path.isdir(env_dir):
        return _search_dir(env_dir, filenames)
    return None


def _search_dir(directory: str, filenames: list[str]) -> str | None:
    for name in filenames:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can the HF hub be resolved at all? A DNS lookup answers in milliseconds offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout_s)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def load_rows(task_name: str, *, data_path: str | None, filenames: list[str], hub_id: str,
              hub_config: str | None, split: str, expected: str):
    """Rows for a task: local file if one is given or found, else `datasets.load_dataset(hub_id, hub_config)`.

    `expected` describes the local format for the error message (e.g. "JSONL with question/answer").
    Under torchrun every rank calls it: each node's local rank 0 goes first (it downloads into the HF cache),
    the node's other ranks then read that cache instead of all hitting the hub at once."""
    with node_leader_first():
        return _load_rows(task_name, data_path, filenames, hub_id, hub_config, split, expected)


def _load_rows(task_name: str, data_path: str | None, filenames: list[str], hub_id: str, hub_config: str | None,
               split: str, expected: str):
    path = find_local_file(task_name, data_path, filenames)
    if path is not None:
        return read_records(path)
    hint = (f"pass {DATA_FLAG} FILE|DIR ({expected}; looked for {', '.join(filenames)}) "
            f"or set ${DATA_DIR_ENV}")
    if not hub_reachable():
        raise UserError(f"{task_name}: the Hugging Face hub is unreachable (offline?) and no local data was given: "
                        f"{hint}")
    try:
        import datasets
        return datasets.load_dataset(hub_id, hub_config, split=split)
    except Exception as e:  # network errors, missing splits, auth: all end the same way for the user
        raise UserError(f"{task_name}: could not load {hub_id} ({hub_config or 'default'}) split {split!r} from "
                        f"the hub ({type(e).__name__}): {hint}") from None
