"""Activation checkpointing (reasoning.checkpointing + the hook in GPT.forward_hidden): gradients equal the plain
backward's (exactly in fp32 and under bf16 autocast, with and without offload, with FP8 linears), the engine's and
no-grad forwards never checkpoint, the saved block inputs are the only tensors kept (and with offload they sit in
host memory), and the planner's auto mode picks the cheapest mode that fits."""

import pytest
import torch

from reasoning import memplan
from reasoning.checkpointing import set_activation_checkpointing
from reasoning.common import UserError
from reasoning.gpt import GPT, GPTConfig
from reasoning.rl import token_logprobs
from scripts.chat_rl import RLConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on a shared box

# Qwen3's block layout in miniature: SwiGLU, GQA, norm gains, q/k-norm gains, tied embeddings, no softcap
QWEN_LIKE = GPTConfig(max_seq_len=64, vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu",
                      norm_weight=True, qk_norm_weight=True, tie_embeddings=True, softcap=None)


def noisy_model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would give zero gradients upstream
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def gradients(model, mode, autocast=False, logprobs=True):
    set_activation_checkpointing(model, mode)
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (3, 40), generator=gen)
    targets = torch.randint(0, model.config.vocab_size, (3, 40), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if logprobs:  # the RL path: forward_hidden + chunked log-probs
            loss = token_logprobs(model, idx, targets, temperature=1.0, chunk_size=16, compute_entropy=False).sum()
        else:  # the SFT / pretraining path: the model's own cross-entropy
            loss = model(idx, targets, loss_reduction="sum")
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("logprobs", [True, False])
def test_checkpointed_gradients_equal_the_plain_ones_exactly(autocast, logprobs):
    model = noisy_model(QWEN_LIKE)
    plain = gradients(model, "off", autocast, logprobs)
    assert all(g.abs().max() > 0 for g in plain.values())
    for mode in ("on", "offload"):
        checkpointed = gradients(model, mode, autocast, logprobs)
        for name in plain:  # recomputation re-runs the same kernels on the same inputs: bit-for-bit
            assert torch.equal(checkpointed[name], plain[name]), (mode, name)


def test_checkpointed_gradients_with_fp8_linears():
    from reasoning.fp8 import convert_to_float8

    model = noisy_model(GPTConfig(max_seq_len=64, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    assert convert_to_float8(model, min_dim=16) > 0
    plain = gradients(model, "off")
    for mode in ("on", "offload"):
        checkpointed = gradients(model, mode)
        for name in plain:  # the recomputed forward quantises the same values with the same scales
            torch.testing.assert_close(checkpointed[name], plain[name], atol=0, rtol=0)


def test_engine_and_no_grad_forwards_do_not_checkpoint(monkeypatch):
    from reasoning import gpt
    from reasoning.engine import Engine

    model = noisy_model(QWEN_LIKE)
    reference = Engine(model).generate([[1, 2, 3], [4, 5]], num_samples=2, max_tokens=6, temperature=0.0)
    calls = []
    original = gpt.checkpointed_block
    monkeypatch.setattr(gpt, "checkpointed_block", lambda *a, **k: calls.append(1) or original(*a, **k))
    set_activation_checkpointing(model, "offload")
    again = Engine(model).generate([[1, 2, 3], [4, 5]], num_samples=2, max_tokens=6, temperature=0.0)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert calls == [] and [g.tokens for g in again] == [g.tokens for g in reference]
    model(torch.tensor([[1, 2, 3]]))  # a training forward does
    assert len(calls) == QWEN_LIKE.n_layer


def test_only_block_inputs_are_kept_and_offload_moves_them_to_the_host():
    config = GPTConfig(max_seq_len=256, vocab_size=128, n_layer=8, n_head=2, n_kv_head=1, n_embd=64, mlp="swiglu")
    B, T = 4, 256
    peaks = {}
    for mode in ("off", "on", "offload"):
        with memplan.Session(config, target="cpu", fake=True) as s:
            set_activation_checkpointing(s.model, mode)
            x = torch.zeros((B, T), dtype=torch.long)

            def forward_only():
                hidden = s.model.forward_hidden(x)
                peaks[mode, "after_forward"] = s.tracker.totals["activations"]
                peaks[mode, "host_after_forward"] = s.tracker.totals[memplan.HOST]
                hidden.sum().backward()
            plan = s.phase("t", "train", {}, forward_only)
            peaks[mode] = plan.breakdown["activations"]
            assert s.tracker.totals[memplan.HOST] == 0  # every host copy is released after the backward
    block_input = B * T * config.n_embd * 4
    # after the forward: "on" holds the n_layer block inputs, the final norm's input/output and the output
    assert peaks["on", "after_forward"] < 0.15 * peaks["off", "after_forward"]
    assert peaks["on", "after_forward"] - peaks["offload", "after_forward"] == config.n_layer * block_input
    assert peaks["offload", "host_after_forward"] == config.n_layer * block_input
    assert peaks["offload"] < peaks["on"] < peaks["off"] / 3


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="expected one of off, on, offload"):
        set_activation_checkpointing(noisy_model(QWEN_LIKE), "auto")
    with pytest.raises(UserError, match="--activation-checkpointing 'sometimes'"):
        RLConfig(activation_checkpointing="sometimes").validate()
    with pytest.raises(UserError, match="--max-tokens-per-micro-batch -5"):
        RLConfig(max_tokens_per_micro_batch=-5).validate()


def test_auto_mode_is_the_cheapest_that_fits_the_batch_and_off_without_a_gpu():
    cost = {"off": 4.0, "on": 1.0, "offload": 0.5}  # GiB per row

    def plan_of(rows, mode):
        return [memplan.PhasePlan("s", "train", {}, dict.fromkeys(memplan.CATEGORIES, 0)
                                  | {"activations": int(rows * cost[mode] * memplan.GIB)})]
    resolve = memplan.resolve_training_memory
    assert resolve(memplan.AUTO, 8, "auto", plan_of, 80.0) == (8, "off")    # 32 GiB fits as it is
    assert resolve(memplan.AUTO, 32, "auto", plan_of, 80.0) == (32, "on")   # 128 GiB does not; 32 does
    assert resolve(memplan.AUTO, 32, "auto", plan_of, 20.0) == (32, "offload")
    assert resolve(memplan.AUTO, 32, "auto", plan_of, 10.0) == (16, "offload")  # nothing fits 32: fewer rows
    assert resolve(4, 32, "auto", plan_of, 10.0) == (4, "on")
    assert resolve(memplan.AUTO, 32, "off", plan_of, 80.0) == (16, "off")   # an explicit mode is kept
    assert resolve(memplan.AUTO, 32, "auto", plan_of, None) == (32, "off")  # CPU: unchanged defaults
    with pytest.raises(UserError, match="--device-batch-size 0"):
        resolve(0, 32, "auto", plan_of, 80.0)


def test_rl_and_sft_plans_run_the_mode_and_the_token_budget():
    from reasoning.gpt import config_from_depth
    from reasoning.sft import SFTConfig
    from reasoning.sft import plan_memory as sft_plan
    from scripts.chat_rl import plan_memory as rl_plan

    model_config = config_from_depth(4, 512, max_seq_len=256)
    totals = {}
    for mode in ("off", "on", "offload"):
        for budget in (0, 200):
            rl_config = RLConfig(prompts_per_step=2, num_samples=4, max_new_tokens=64, device_batch_size=8,
                                 logprob_chunk_size=64, eval_every=-1, activation_checkpointing=mode,
                                 max_tokens_per_micro_batch=budget)
            train = [p for p in rl_plan(rl_config, model_config, prompt_tokens=64) if p.phase == "train"][0]
            assert train.settings["activation_checkpointing"] == mode
            assert train.settings["device_batch_size"] == (8 if budget == 0 else 1)  # 200 tokens: one 127-token row
            totals["rl", mode, budget] = train.total
        sft_config = SFTConfig(device_batch_size=4, total_batch_rows=4, max_seq_len=128, eval_every=-1,
                               activation_checkpointing=mode)
        totals["sft", mode] = sft_plan(sft_config, model_config)[0].total
    assert totals["rl", "offload", 0] < totals["rl", "on", 0] < totals["rl", "off", 0]
    assert totals["rl", "off", 200] < totals["rl", "off", 0]
    assert totals["sft", "offload"] < totals["sft", "on"] < totals["sft", "off"]
    # a plan asked for directly with "auto" plans the CPU default (off)
    auto = RLConfig(prompts_per_step=2, num_samples=4, max_new_tokens=64, device_batch_size=8, logprob_chunk_size=64,
                    eval_every=-1)
    assert [p for p in rl_plan(auto, model_config, prompt_tokens=64) if p.phase == "train"][0].total == \
        totals["rl", "off", 0]
