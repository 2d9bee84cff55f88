"""Shared test fixtures: a small offline pretraining corpus and a tokenizer trained on it (built once per session)."""

import json
import os
from dataclasses import dataclass

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower tests (compilation, subprocess launches); deselect with "
                                       "-m 'not slow'")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box run fastest on one thread (no contention); restores the setting after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class TinyCorpus:
    data_dir: str  # parquet shards: the last one is the validation split
    tokenizer_dir: str  # tokenizer trained on the train shards (vocab 512)
    vocab_size: int


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> TinyCorpus:
    """3 shards × 400 synthetic documents (~150k tokens of train text, 8 row groups per shard) + a 512 vocab."""
    from reasoning.dataset import iter_documents
    from reasoning.tokenizer import train_tokenizer
    from tasks.synthetic import write_synthetic_corpus

    root = tmp_path_factory.mktemp("tiny_corpus")
    data_dir = os.path.join(root, "data")
    write_synthetic_corpus(data_dir, num_shards=3, docs_per_shard=400, seed=0)
    tokenizer = train_tokenizer(iter_documents(data_dir, split="train"), 512)
    tokenizer_dir = os.path.join(root, "tokenizer")
    tokenizer.save(tokenizer_dir)
    return TinyCorpus(data_dir, tokenizer_dir, tokenizer.vocab_size)


@pytest.fixture(scope="session")
def runcpu(tmp_path_factory):
    """One micro run of runs/runcpu.sh per session (test_pipeline's knobs): (base_dir, env, stdout). Defined here, not
    in a test module, so that test_pipeline and test_newcomer share it (neither writes into the run)."""
    from test_pipeline import run_runcpu_micro

    return run_runcpu_micro(tmp_path_factory.mktemp("runcpu"))


@pytest.fixture(scope="session")
def core_bundle(tmp_path_factory):
    """A tiny CORE eval bundle (one task of each type, 6 examples each): (bundle dir, {file: examples})."""
    root = str(tmp_path_factory.mktemp("eval_bundle"))
    n = 6
    data = os.path.join(root, "eval_data")
    os.makedirs(data)
    tasks = {
        "mc.jsonl": [{"query": f"The number after {i} is", "choices": [f" {i + 1}", f" {i + 2}", f" {i + 7}"],
                      "gold": 0} for i in range(n)],
        "schema.jsonl": [{"context_options": [f"A cat has {w} legs", "A cat has four legs"], "continuation": ".",
                          "gold": 1} for w in ("two", "six", "eight", "one", "ten", "nine")[:n]],
        "lm.jsonl": [{"context": f"After {d} comes", "continuation": " the next day"} for d in range(n)],
    }
    for name, rows in tasks.items():
        with open(os.path.join(data, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("icl_tasks:\n"
                "- {label: count, dataset_uri: mc.jsonl, num_fewshot: [2], icl_task_type: multiple_choice}\n"
                "- {label: legs, dataset_uri: schema.jsonl, num_fewshot: [0], icl_task_type: schema}\n"
                "- {label: days, dataset_uri: lm.jsonl, num_fewshot: [1], icl_task_type: language_modeling,"
                " continuation_delimiter: ''}\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Random baseline\ncount,33.33\nlegs,50\ndays,0\n")
    return root, tasks
