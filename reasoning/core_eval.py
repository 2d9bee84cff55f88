"""CORE-style in-context evaluation of base models (the DCLM "CORE" metric that nanochat reports).

A bundle is a local folder (nothing is downloaded):
    core.yaml             icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type, continuation_delimiter}]
    eval_meta_data.csv    columns "Eval Task" and "Random baseline" (percent), one row per label
    eval_data/<uri>       JSONL examples

Three task types, each scored by the model's loss on continuations, never by sampling:
  - multiple_choice {"query", "choices", "gold"}: the choice whose tokens have the lowest mean loss after the query;
  - schema {"context_options", "continuation", "gold"}: the context under which the fixed continuation is likeliest;
  - language_modeling {"context", "continuation"}: correct when greedy decoding reproduces every continuation token.
Few-shot examples (other examples of the same task with their answers, picked by a seeded RNG per example) are
prepended, separated by blank lines. Accuracy is centred on the random baseline, (acc - b) / (1 - b), and CORE is
the mean centred accuracy over tasks. Examples are sharded over ranks (i mod world_size); counts are all-reduced.
"""

from __future__ import annotations

import csv
import os
import random

import torch
import torch.nn.functional as F

from reasoning.common import UserError, autocast_context, read_jsonl
from reasoning.distributed import all_reduce_sum

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


def load_bundle(bundle_dir: str) -> list[dict]:
    """Task specs {label, path, num_fewshot, task_type, delimiter, baseline (fraction)} from a bundle folder."""
    import yaml

    config_path = os.path.join(bundle_dir, "core.yaml")
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (config_path, meta_path):
        if not os.path.isfile(path):
            raise UserError(f"eval bundle {bundle_dir} has no {os.path.basename(path)}: expected core.yaml, "
                            "eval_meta_data.csv and eval_data/")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    with open(meta_path, encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    specs = []
    for task in config.get("icl_tasks", []):
        label, task_type = task["label"], task["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise UserError(f"{config_path}: task {label} has icl_task_type {task_type!r}; expected one of "
                            f"{', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise UserError(f"{meta_path}: no random baseline for task {label}")
        shots = task.get("num_fewshot", [0])
        specs.append({"label": label, "path": os.path.join(bundle_dir, "eval_data", task["dataset_uri"]),
                      "num_fewshot": int(shots[0] if isinstance(shots, list) else shots), "task_type": task_type,
                      "delimiter": task.get("continuation_delimiter", " "), "baseline": baselines[label]})
    if not specs:
        raise UserError(f"{config_path} lists no icl_tasks")
    return specs


def _with_answer(task_type: str, example: dict, delimiter: str) -> str:
    """An example written out with its correct answer (the form few-shot examples take)."""
    if task_type == "multiple_choice":
        return example["query"] + delimiter + example["choices"][example["gold"]]
    if task_type == "schema":
        return example["context_options"][example["gold"]] + delimiter + example["continuation"]
    return example["context"] + delimiter + example["continuation"]


def render_example(task_type: str, example: dict, shots: list[dict], delimiter: str) -> list[tuple[str, str]]:
    """(context, continuation) pairs to score: one per choice / context option, one for language modelling."""
    prefix = "".join(_with_answer(task_type, s, delimiter) + "\n\n" for s in shots)
    if task_type == "multiple_choice":
        return [(prefix + example["query"] + delimiter, choice) for choice in example["choices"]]
    if task_type == "schema":
        return [(prefix + option + delimiter, example["continuation"]) for option in example["context_options"]]
    return [(prefix + example["context"] + delimiter, example["continuation"])]


@torch.no_grad()
def score_continuations(model, tokenizer, pairs: list[tuple[str, str]], device, dtype=torch.float32,
                        max_len: int | None = None) -> list[tuple[float, bool]]:
    """For every (context, continuation): (mean loss of the continuation tokens, all of them greedy-predicted).

    Sequences are <|bos|> context continuation, cropped from the left to the model's context, right-padded into one
    batch; padding is never a target and, being to the right, never attended to by real tokens (causal mask).
    """
    max_len = max_len or model.config.max_seq_len
    rows, spans = [], []
    for context, continuation in pairs:
        cont = tokenizer.encode(continuation)
        if not cont:
            raise ValueError(f"empty continuation {continuation!r} cannot be scored")
        ids = tokenizer.encode(context, prepend=tokenizer.bos_token_id) + cont
        ids = ids[-(max_len + 1):]  # +1: the last token is only a target
        rows.append(ids)
        spans.append(len(cont))
    width = max(len(r) for r in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, n_cont) in enumerate(zip(rows, spans)):
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        targets[i, n - n_cont:n] = torch.tensor(ids[-n_cont:])  # only the continuation is scored
    inputs, targets = inputs.to(device), targets.to(device)
    with autocast_context(device, dtype):
        logits = model(inputs)  # (B, T, V) float32
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction="none")  # (B, T)
    scored = targets >= 0
    mean_loss = (losses * scored).sum(1) / scored.sum(1)
    hits = ((logits.argmax(-1) == targets) | ~scored).all(1)
    return list(zip(mean_loss.tolist(), hits.tolist()))


def is_correct(task_type: str, example: dict, scores: list[tuple[float, bool]]) -> bool:
    if task_type == "language_modeling":
        return scores[0][1]
    best = min(range(len(scores)), key=lambda i: scores[i][0])
    return best == example["gold"]


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"eval bundle data file {path} is missing")
    return read_jsonl(path)


def evaluate_core(model, tokenizer, bundle_dir: str, device="cpu", dtype=torch.float32,
                  max_per_task: int | None = None, rank: int = 0, world_size: int = 1, seed: int = 1234) -> dict:
    """{"core": mean centred accuracy, "tasks": [{task, type, shots, examples, accuracy, centered}]}."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for spec in load_bundle(bundle_dir):
            examples = _read_jsonl(spec["path"])
            if max_per_task is not None:
                examples = examples[:max_per_task]
            correct = torch.zeros(2, dtype=torch.float64)  # [correct, seen] on this rank
            for i in range(rank, len(examples), world_size):
                others = [j for j in range(len(examples)) if j != i]
                picks = random.Random(seed + i).sample(others, min(spec["num_fewshot"], len(others)))
                pairs = render_example(spec["task_type"], examples[i], [examples[j] for j in picks],
                                       spec["delimiter"])
                scores = score_continuations(model, tokenizer, pairs, device, dtype)
                correct += torch.tensor([float(is_correct(spec["task_type"], examples[i], scores)), 1.0],
                                        dtype=torch.float64)
            all_reduce_sum(correct)  # a CPU tensor: the helper moves it to the group's device and back
            accuracy = (correct[0] / correct[1]).item() if correct[1] > 0 else 0.0
            b = spec["baseline"]
            rows.append({"task": spec["label"], "type": spec["task_type"], "shots": spec["num_fewshot"],
                         "examples": int(correct[1].item()), "accuracy": accuracy,
                         "centered": (accuracy - b) / (1 - b)})
    finally:
        model.train(was_training)
    return {"core": sum(r["centered"] for r in rows) / len(rows), "tasks": rows}
