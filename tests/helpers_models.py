"""Tiny models and checkpoints for the SFT / eval tests and dev/bench_eval.py.

`train_small_tokenizer` trains a ~512-token BPE on synthetic problems (seconds); `tiny_model` builds a random GPT
(depth 1-4, width 32-128) with some noise on every weight so greedy decoding is not degenerate; `save_tiny_checkpoint`
writes it with reasoning.checkpoint.save_checkpoint under `<base>/checkpoints/<stage>/<tag>/`, meta carrying
model_config and tokenizer_dir, which is what reasoning.checkpoint.load_model needs.
"""

from __future__ import annotations

import os

import torch

from reasoning.checkpoint import checkpoint_dir, save_checkpoint
from reasoning.gpt import GPT, GPTConfig
from reasoning.tokenizer import Tokenizer, train_tokenizer


def synthetic_texts(n: int = 1500, seed: int = 0) -> list[str]:
    """User prompts and worked solutions of synthetic train problems (what the tiny models see)."""
    from tasks.synthetic import SyntheticReasoning

    task = SyntheticReasoning(split="train", size=n, seed=seed)
    texts = []
    for example in task:
        user, assistant = example["messages"]
        texts.append(user["content"])
        texts.extend(part["text"] for part in assistant["content"])
    return texts


def train_small_tokenizer(out_dir: str, vocab_size: int = 512) -> Tokenizer:
    tokenizer = train_tokenizer(iter(synthetic_texts()), vocab_size)
    tokenizer.save(out_dir)
    return tokenizer


def tiny_model(vocab_size: int, depth: int = 2, n_embd: int = 64, n_head: int = 2, max_seq_len: int = 512,
               seed: int = 0, noise: float = 0.1) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(max_seq_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if noise:
        with torch.no_grad():  # the zero-initialised projections and the 1e-3 head would make every row alike
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
            model.lm_head.weight.mul_(20.0)
    return model


def save_tiny_checkpoint(base_dir: str, tokenizer_dir: str, stage: str = "base", tag: str = "tiny", step: int = 0,
                         **model_kwargs) -> str:
    """Random tiny GPT for the tokenizer in tokenizer_dir, saved as a complete checkpoint; returns its dir."""
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = tiny_model(tokenizer.vocab_size, **model_kwargs)
    ckpt_dir = checkpoint_dir(stage, tag, base_dir)
    save_checkpoint(ckpt_dir, step, model.state_dict(),
                    meta={"model_config": model.config.to_dict(), "tokenizer_dir": os.path.abspath(tokenizer_dir),
                          "stage": stage})
    return ckpt_dir
