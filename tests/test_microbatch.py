"""Token-budget micro-batches (reasoning.microbatch) in the RL and SFT training passes: the grouping obeys the row
cap and the token budget and pads less than fixed row counts on ragged lengths; the accumulated gradient equals the
fixed-row-count path's and one big batch's (RL: every loss type, through scripts/chat_rl.py's update_policy; SFT:
scripts/chat_sft.py's train end to end)."""

import contextlib
import random

import pytest
import torch

from helpers_models import tiny_model, train_small_tokenizer
from reasoning.checkpoint import ModelSource
from reasoning.microbatch import micro_batches, padding_waste
from reasoning.optim import OptimizerSettings
from reasoning.rl import Learner, frozen_logprobs
from reasoning.rollout import TrainingRows
from reasoning.sft import ConversationStream, SFTConfig
from scripts.chat_rl import RLConfig, needs_frozen_logprobs, update_policy
from scripts.chat_sft import train as train_sft
from tasks.synthetic import SyntheticReasoning

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on a shared box


# ----------------------------------------------------------------------------------------------- grouping

def test_budget_groups_obey_caps_cover_every_row_once_and_pad_less():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(6.3, 0.7)) + 1 for _ in range(300)]  # heavy tail, like reasoning traces
    rows = list(range(0, 300, 2)) + list(range(1, 300, 2))
    budget, cap = 2048, 16
    groups = micro_batches(lengths, rows, cap, budget)
    assert sorted(i for g in groups for i in g) == sorted(rows)
    for g in groups:
        assert len(g) <= cap
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget  # a longer row goes alone
    assert any(len(g) == 1 and lengths[g[0]] > budget for g in groups)
    fixed_in_order = [rows[i:i + 8] for i in range(0, len(rows), 8)]  # SFT's stream order
    assert padding_waste(lengths, groups) < padding_waste(lengths, fixed_in_order) / 3


def test_without_budget_it_is_the_sorted_fixed_row_slices():
    lengths = [5, 3, 9, 3, 7, 1, 8]
    rows = [6, 0, 1, 2, 3, 4, 5]
    assert micro_batches(lengths, rows, 3) == [[5, 1, 3], [0, 4, 6], [2]]  # stable: rows 1 and 3 tie, keep order
    assert padding_waste(lengths, [[0, 2]]) == pytest.approx(4 / 18)
    with pytest.raises(ValueError, match="max_rows"):
        micro_batches(lengths, rows, 0)
    with pytest.raises(ValueError, match="max_tokens"):
        micro_batches(lengths, rows, 2, -1)


# ----------------------------------------------------------------------------------------------- RL

def ragged_rows(vocab: int, n: int, seed: int = 0) -> TrainingRows:
    """n right-padded rows of 3-8 prompt tokens + 2-29 completion tokens with sampler log-probs."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 9, (n,), generator=gen).tolist()
    completions = torch.randint(2, 30, (n,), generator=gen).tolist()
    lengths = [p + c - 1 for p, c in zip(prompts, completions)]
    T = max(lengths)
    inputs = torch.zeros((n, T), dtype=torch.long)
    targets = torch.full((n, T), -1, dtype=torch.long)
    sampler = torch.zeros((n, T))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens = torch.randint(0, vocab, (p + c,), generator=gen)
        inputs[i, :lengths[i]] = tokens[:-1]
        targets[i, p - 1:p + c - 1] = tokens[p:]
        sampler[i, p - 1:p + c - 1] = -torch.rand(c, generator=gen) * 3
    return TrainingRows(inputs, targets, sampler, (targets >= 0).float(), lengths)


def rl_gradients(data, advantages, loss_type, device_batch_size, max_tokens, checkpointing="off"):
    from reasoning.checkpointing import set_activation_checkpointing

    model = tiny_model(64, depth=2, n_embd=32, max_seq_len=64, seed=1)
    set_activation_checkpointing(model, checkpointing)
    optimizer = model.setup_optimizer(OptimizerSettings(matrix_lr=0.0, embedding_lr=0.0, lm_head_lr=0.0, scalar_lr=0.0))
    captured = {}
    original_step = optimizer.step

    def capture_step(*args, **kwargs):  # the accumulated gradient, as the optimizer would see it
        captured.update({name: p.grad.clone() for name, p in model.named_parameters()})
        return original_step(*args, **kwargs)
    optimizer.step = capture_step
    config = RLConfig(loss_type=loss_type, device_batch_size=device_batch_size,
                         max_tokens_per_micro_batch=max_tokens, grad_clip=0.0, max_new_tokens=32,
                         logprob_chunk_size=16, lr_scale=0.0)
    rows = list(range(len(data.lengths)))
    learner = Learner(model, optimizer, None, torch.device("cpu"), contextlib.nullcontext)
    frozen = None
    if needs_frozen_logprobs(config, learner):  # as chat_rl's loop does
        frozen = frozen_logprobs(learner, data, rows, config.device_batch_size, config.temperature,
                                 config.logprob_chunk_size, config.max_tokens_per_micro_batch, config.matmul_dtype)
    update_policy(learner, data, advantages, rows, frozen, config, 0)
    return captured


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_rl_token_budget_gradient_equals_fixed_rows_and_one_batch(loss_type):
    data = ragged_rows(64, 12)
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(2))
    one_batch = rl_gradients(data, advantages, loss_type, 12, 0)
    fixed = rl_gradients(data, advantages, loss_type, 3, 0)
    groups = micro_batches(data.lengths, range(12), 12, 60)
    assert len(groups) > 3 and len({len(g) for g in groups}) > 1  # the budget really regroups the rows
    budget = rl_gradients(data, advantages, loss_type, 12, 60)
    assert one_batch["lm_head.weight"].abs().max() > 0
    for name in one_batch:
        torch.testing.assert_close(budget[name], one_batch[name], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(budget[name], fixed[name], atol=1e-6, rtol=1e-4)


def test_rl_checkpointed_update_has_the_plain_gradient_exactly():
    data = ragged_rows(64, 8, seed=3)
    advantages = torch.randn(8, generator=torch.Generator().manual_seed(4))
    plain = rl_gradients(data, advantages, "dapo", 4, 0)
    for mode in ("on", "offload"):
        checkpointed = rl_gradients(data, advantages, "dapo", 4, 0, checkpointing=mode)
        assert all(torch.equal(plain[name], checkpointed[name]) for name in plain), mode


# ----------------------------------------------------------------------------------------------- SFT

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_small_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer"))


def test_sft_stream_budget_serves_the_same_rows_grouped_by_length(tokenizer):
    task = SyntheticReasoning("train", size=64, seed=3, num_steps=(1, 4))
    plain = ConversationStream(task, tokenizer, max_seq_len=256, seed=0)
    budget = ConversationStream(task, tokenizer, max_seq_len=256, seed=0)
    by_rows = plain.next_micro_batches([4, 4, 4, 4])
    by_tokens = budget.next_micro_batches([4, 4, 4, 4], max_tokens=300)
    assert plain.position == budget.position == 16

    def rows_of(batches):
        return sorted(tuple(t for t in y.tolist() if t >= 0) for _, ys in batches for y in ys)
    assert rows_of(by_tokens) == rows_of(by_rows)
    assert all(x.shape[0] == 1 or x.numel() <= 300 for x, _ in by_tokens)
    assert sum(x.numel() for x, _ in by_tokens) < sum(x.numel() for x, _ in by_rows)


def test_sft_token_budget_trains_to_the_same_weights(tokenizer, tmp_path):
    train = SyntheticReasoning("train", size=24, seed=5, num_steps=(1, 4))
    weights = []
    for i, (rows, budget) in enumerate(((8, 0), (3, 0), (8, 200))):
        model = tiny_model(tokenizer.vocab_size, max_seq_len=256, noise=0.1)
        config = SFTConfig(device_batch_size=rows, total_batch_rows=8, max_tokens_per_micro_batch=budget,
                           max_seq_len=256, num_iterations=2, eval_every=-1, log_every=1000,
                           base_dir=str(tmp_path / str(i)), out_tag="t", keep_last=0)
        train_sft(config, model, tokenizer, ModelSource(dir="test", step=0), tasks=(train, None, None))
        weights.append(model.state_dict())
    for other in weights[1:]:
        for name in weights[0]:
            torch.testing.assert_close(other[name], weights[0][name], atol=2e-5, rtol=1e-4)
