"""Task registry: task names -> Task objects, and where a task's rows come from (a local file or the HF hub).

Names (case-insensitive): "synthetic", "GSM8K", "MATH", "MATH-500", "SmolTalk", "customjson:PATH".
A mixture spec is a comma list of names, each optionally `*N` to oversample it N times and `@PATH` to give that
task its own local data, e.g. "GSM8K*2,MATH,SmolTalk,customjson:traces.jsonl".

Data sources, first match wins (DESIGN.md: "no hidden downloads", "offline default"):
  1. `data_path` (the scripts' `--data-path`, or a task's own `@PATH`): a file is read as is; a folder is searched
     for the task's conventional file names (e.g. `gsm8k_train.jsonl`, `math500_test.json`);
  2. `$REASONING_DATA_DIR`, searched the same way (a folder without those files falls through);
  3. the Hugging Face hub through `datasets`. Offline, this fails at once with one line naming `--data-path`
     (the hub's own client would retry for ~30 s first).
Local files may be JSON (a list of objects), JSONL or parquet.
"""

from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlparse

from reasoning.common import UserError, parse_json, read_jsonl  # noqa: F401 (read_jsonl: re-exported)
from reasoning.distributed import node_leader_first
from tasks.common import Task, TaskMixture

DATA_DIR_ENV = "REASONING_DATA_DIR"
DATA_FLAG = "--data-path"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# canonical name -> the factory's module (imported lazily: the task modules import this one for loading)
TASK_NAMES = ("synthetic", "GSM8K", "MATH", "MATH-500", "SmolTalk", "customjson")
_CANONICAL = {name.lower(): name for name in TASK_NAMES}
_CANONICAL.update({"math500": "MATH-500", "gsm8k": "GSM8K", "smol-smoltalk": "SmolTalk"})

# synthetic task sizes when none is asked for: plenty for SFT on CPU, and an eval set large enough that a greedy
# accuracy has a standard error of <= 1.6 points (problem i is the same for any size: the first 500 are the old set)
DEFAULT_SYNTHETIC_SIZE = {"train": 20_000, "test": 1000}


# ----------------------------------------------------------------------------------------------- reading rows

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


# ----------------------------------------------------------------------------------------------- names -> tasks

def canonical_name(name: str) -> str:
    """Registered spelling of a task name ("gsm8k" -> "GSM8K"); customjson keeps its path."""
    head, sep, rest = name.strip().partition(":")
    canonical = _CANONICAL.get(head.lower())
    if canonical is None:
        raise UserError(f"unknown task {name!r}: expected one of synthetic, GSM8K, MATH, MATH-500, SmolTalk, "
                        f"customjson:PATH")
    if canonical == "customjson":
        if not rest:
            raise UserError(f"task {name!r}: customjson needs a file, e.g. customjson:traces.jsonl")
        return f"customjson:{rest}"
    if sep:
        raise UserError(f"task {name!r}: only customjson takes ':PATH' (use NAME@PATH for a local file)")
    return canonical


def build_task(name: str, split: str = "train", data_path: str | None = None, seed: int = 0,
               size: int | None = None, **options) -> Task:
    """One task by name. `size` caps the number of examples (synthetic: how many to generate);
    extra `options` go to the task's constructor (e.g. difficulty= for synthetic, hub_id= for MATH)."""
    name = canonical_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    if name == "synthetic":
        from tasks.synthetic import SyntheticReasoning
        return SyntheticReasoning(split=split, size=size or DEFAULT_SYNTHETIC_SIZE[split], seed=seed, **options)
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        task = GSM8K(split=split, data_path=data_path, **options)
    elif name == "MATH":
        from tasks.math import MATH
        task = MATH(split=split, data_path=data_path, **options)
    elif name == "MATH-500":
        if split != "test":  # a test set only; training on it would also contaminate the headline benchmark
            raise ValueError("MATH-500 has only a test split (for training use MATH, the train split of the "
                             f"competition set); got split={split!r}")
        from tasks.math import MATH500
        task = MATH500(data_path=data_path, **options)
    elif name == "SmolTalk":
        from tasks.smoltalk import SmolTalk
        task = SmolTalk(split=split, data_path=data_path, **options)
    else:
        from tasks.customjson import CustomJSON
        task = CustomJSON(name.split(":", 1)[1], **options)
    return task[:size] if size is not None and size < len(task) else task


_ITEM_RE = re.compile(r"^(?P<name>[^*@]+?)\s*(?:\*\s*(?P<times>\d+))?\s*(?:@(?P<path>.+))?$")


def parse_mixture(spec: str) -> list[tuple[str, int, str | None]]:
    """"GSM8K*2,MATH@dir" -> [("GSM8K", 2, None), ("MATH", 1, "dir")]. Raises UserError on a malformed spec."""
    items = []
    for raw in (spec or "").split(","):
        raw = raw.strip()
        if not raw:
            continue
        match = _ITEM_RE.match(raw)
        if match is None:
            raise UserError(f"task spec item {raw!r}: expected NAME, NAME*N or NAME@PATH")
        times = int(match.group("times") or 1)
        if times < 1:
            raise UserError(f"task spec item {raw!r}: the repeat count must be >= 1")
        items.append((canonical_name(match.group("name")), times, match.group("path")))
    if not items:
        raise UserError(f"task spec {spec!r} names no task: expected e.g. 'synthetic' or 'GSM8K,MATH,SmolTalk'")
    return items


def build_mixture(spec: str, split: str = "train", data_path: str | None = None, seed: int = 0,
                  size: int | None = None, task_options: dict[str, dict] | None = None) -> Task:
    """A TaskMixture (seeded shuffle) over the comma-separated spec; a single unrepeated task is returned as is.

    `data_path` is shared by the items without their own @PATH; a FILE (rather than a folder) only makes sense
    when at most one such item reads local data. `task_options` maps a canonical name ("synthetic") to extra
    constructor arguments for that task only."""
    task_options = task_options or {}
    items = parse_mixture(spec)
    if data_path and os.path.isfile(data_path):
        sharing = [name for name, _, path in items if path is None and name not in ("synthetic",)
                   and not name.startswith("customjson:")]
        if len(sharing) > 1:
            raise UserError(f"{DATA_FLAG} {data_path} is one file but the mixture has {', '.join(sharing)}: "
                            f"pass a folder, or give each task its own NAME@PATH")
    tasks = []
    for name, times, path in items:
        options = task_options.get(name.split(":", 1)[0], {})
        task = build_task(name, split=split, data_path=path or data_path, seed=seed, size=size, **options)
        tasks.extend([task] * times)
    if len(tasks) == 1:
        return tasks[0]
    return TaskMixture(tasks, seed=seed)


def task_label(name: str) -> str:
    """A short, filesystem-safe label for output folders and report sections ("customjson:a/b.jsonl" -> "b")."""
    name = canonical_name(name)
    if name.startswith("customjson:"):
        name = "customjson_" + os.path.splitext(os.path.basename(name.split(":", 1)[1]))[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
