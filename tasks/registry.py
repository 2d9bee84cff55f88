"""Task registry: task names -> Task objects (where their rows come from: tasks/sources.py).

Names (case-insensitive): "synthetic", "GSM8K", "GSM8K-iCoT" (GSM8K with its calculation steps, for chat_latent),
"MATH", "MATH-500", "SmolTalk", "customjson:PATH".
A mixture spec is a comma list of names, each optionally `*N` to oversample it N times and `@PATH` to give that
task its own local data, e.g. "GSM8K*2,MATH,SmolTalk,customjson:traces.jsonl".
"""

from __future__ import annotations

import os
import re

from reasoning.common import UserError, print0
from tasks.common import Task, TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.gsm8k_icot import GSM8KiCoT
from tasks.math import MATH, MATH500
from tasks.smoltalk import SmolTalk
from tasks.sources import DATA_FLAG
from tasks.synthetic import DIFFICULTY, SyntheticReasoning

TASK_NAMES = ("synthetic", "GSM8K", "GSM8K-iCoT", "MATH", "MATH-500", "SmolTalk", "customjson")
_CANONICAL = {name.lower(): name for name in TASK_NAMES}
_CANONICAL.update({"math500": "MATH-500", "gsm8k": "GSM8K", "smol-smoltalk": "SmolTalk"})

# synthetic task sizes when none is asked for: plenty for SFT on CPU, and an eval set large enough that a greedy
# accuracy has a standard error of <= 1.6 points (problem i is the same for any size: the first 500 are the old set)
DEFAULT_SYNTHETIC_SIZE = {"train": 20_000, "test": 1000}


# ----------------------------------------------------------------------------------------------- names -> tasks

def canonical_name(name: str) -> str:
    """Registered spelling of a task name ("gsm8k" -> "GSM8K"); customjson keeps its path."""
    head, sep, rest = name.strip().partition(":")
    canonical = _CANONICAL.get(head.lower())
    if canonical is None:
        raise UserError(f"unknown task {name!r}: expected one of synthetic, GSM8K, GSM8K-iCoT, MATH, MATH-500, "
                        f"SmolTalk, customjson:PATH")
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
        difficulty = options.get("difficulty")
        if difficulty is not None and difficulty not in DIFFICULTY:  # a flag's value (--synthetic-difficulty)
            raise UserError(f"synthetic difficulty {difficulty!r}: expected one of {', '.join(DIFFICULTY)}")
        return SyntheticReasoning(split=split, size=size or DEFAULT_SYNTHETIC_SIZE[split], seed=seed, **options)
    if name == "GSM8K":
        task = GSM8K(split=split, data_path=data_path, **options)
    elif name == "GSM8K-iCoT":
        task = GSM8KiCoT(split=split, data_path=data_path, **options)
    elif name == "MATH":
        task = MATH(split=split, data_path=data_path, **options)
    elif name == "MATH-500":
        if split != "test":  # a test set only; training on it would also contaminate the headline benchmark
            raise ValueError("MATH-500 has only a test split (for training use MATH, the train split of the "
                             f"competition set); got split={split!r}")
        task = MATH500(data_path=data_path, **options)
    elif name == "SmolTalk":
        task = SmolTalk(split=split, data_path=data_path, **options)
    else:
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


def section_name(task_name: str, stage: str, num_samples: int = 1) -> str:
    """Report section of an eval: chat_eval_<stage> (synthetic), math500_<stage>, gsm8k_<stage>, ...;
    a sampled eval (k > 1) gets its own section `<...>_k<k>` so it never replaces the greedy one."""
    label = task_label(task_name)
    suffix = f"_k{num_samples}" if num_samples > 1 else ""
    if label == "synthetic":
        return f"chat_eval_{stage}{suffix}"
    return f"{label.lower().replace('-', '')}_{stage}{suffix}"


# ----------------------------------------------------------------------------------------------- stage tasks

def build_sft_tasks(config):
    """(train task, validation task or None, generative eval task or None) for an SFTConfig.

    Validation: the test splits of the mixture's tasks, capped at val_examples. A task without a test split
    (customjson, a single local file, a folder holding only the train file) is left out with a notice; a
    mixture with none left gets no validation loss."""
    options = {"synthetic": {"difficulty": config.synthetic_difficulty}}
    size = None if config.task_size == -1 else config.task_size
    train_options = {"synthetic": dict(options["synthetic"], answer_only_frac=config.synthetic_answer_only)}
    train = build_mixture(config.task, split="train", data_path=config.data_path, seed=config.seed, size=size,
                          task_options=train_options)
    val = None
    if config.val_examples > 0:
        held_out = []
        for name, times, path in parse_mixture(config.task):
            path = path or config.data_path
            if name.startswith("customjson:") or (path and os.path.isfile(path) and name != "synthetic"):
                print0(f"validation: {name} has no test split here; left out of the validation loss")
                continue
            try:
                task = build_task(name, split="test", data_path=path, seed=config.seed, **options.get(name, {}))
            except UserError as e:
                print0(f"validation: {name} test split unavailable ({e}); left out of the validation loss")
                continue
            held_out.extend([task] * times)
        if held_out:
            val = (held_out[0] if len(held_out) == 1 else TaskMixture(held_out, seed=config.seed))
            val = val[:config.val_examples]
    gen_eval = None
    if config.eval_every >= 0 and config.eval_task:
        gen_eval = build_task(config.eval_task, split="test", data_path=config.data_path, seed=config.seed,
                              size=config.eval_problems, **options.get(config.eval_task.lower(), {}))
    return train, val, gen_eval


def build_rl_tasks(config):
    """(train task, held-out eval task or None) for an RLConfig: the train split of `task`, the test split of
    `eval_task`."""
    options = {"synthetic": {"difficulty": config.synthetic_difficulty}}
    size = None if config.task_size == -1 else config.task_size
    train = build_mixture(config.task, split="train", data_path=config.data_path, seed=config.seed, size=size,
                          task_options=options)
    held_out = None
    if config.eval_every >= 0:
        held_out = build_mixture(config.eval_task or config.task, split="test", data_path=config.data_path,
                                 seed=config.seed, task_options=options)
    return train, held_out
