"""The memory planner (reasoning.memplan): fake-tensor plans against the CPU allocator, the breakdown, the KV cache,
CUDA's autocast policy, the fit checks the stages run at startup, and the plan_memory CLI."""

import pytest
import torch
import torch.nn.functional as F

from reasoning import memplan
from reasoning.common import UserError
from reasoning.engine import BLOCK_SIZE, KV_MEMORY_FRACTION, activation_reserve_bytes, kv_bytes_per_token
from reasoning.gpt import GPT, config_from_depth
from reasoning.pretrain import TrainConfig
from reasoning.pretrain import plan_memory as pretrain_plan
from reasoning.pretrain import resolve_device_batch as pretrain_resolve
from scripts.chat_rl import RLConfig
from scripts.chat_rl import plan_memory as rl_plan
from reasoning.sft import SFTConfig
from reasoning.sft import plan_memory as sft_plan

TINY = config_from_depth(2, 512, max_seq_len=128)


def _peak(plans):
    return max(p.total for p in plans)


@pytest.mark.parametrize("stage", ["base_train", "chat_sft", "chat_rl", "chat_eval"])
def test_fake_tensor_plan_matches_the_cpu_allocator_peak(stage):
    plan = {
        "base_train": lambda fake: pretrain_plan(TrainConfig(depth=2, device_batch_size=4, max_seq_len=64), TINY,
                                                 target="cpu", fake=fake),
        "chat_sft": lambda fake: sft_plan(SFTConfig(device_batch_size=2, total_batch_rows=4, max_seq_len=64,
                                                    eval_every=-1), TINY, target="cpu", fake=fake),
        "chat_rl": lambda fake: rl_plan(RLConfig(prompts_per_step=2, num_samples=4, max_new_tokens=24,
                                                 device_batch_size=4, logprob_chunk_size=32, eval_every=-1),
                                        TINY, target="cpu", fake=fake, prompt_tokens=16),
        "chat_eval": lambda fake: memplan.plan_chat_eval(4, 2, 24, TINY, target="cpu", fake=fake, prompt_tokens=16),
    }[stage]
    predicted = _peak(plan(True))
    measured = memplan.measure_cpu_peak(lambda: plan(False))
    assert measured > 0
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_breakdown_counts_weights_gradients_and_optimizer_state():
    config = TrainConfig(depth=2, device_batch_size=2, max_seq_len=64, total_batch_size=2 * 2 * 64)  # 2 micro-steps
    (plan,) = pretrain_plan(config, TINY, target="cpu")
    with torch.device("meta"):
        model = GPT(TINY)
    groups = model.param_groups()
    matrix = sum(p.numel() for p in groups["matrix"])
    other = model.num_params() - matrix
    b = plan.breakdown
    assert b["params"] >= 4 * model.num_params()  # fp32 weights (+ the rotary tables)
    assert b["params"] - 4 * model.num_params() == 2 * model.rotary_cos.numel() * 4
    assert b["optimizer"] >= 4 * matrix + 2 * 4 * other  # Muon momentum + AdamW's two moments
    assert 0 < b["grads"] <= 4 * model.num_params()  # the peak is inside the 2nd micro-batch's backward
    assert b["logits"] >= 2 * 64 * TINY.vocab_size * 4  # fp32 logits of one micro-batch
    assert plan.settings["accumulation"] == 2


def test_engine_kv_cache_is_planned_in_bf16_for_the_gpu():
    rows, prompt, new = 4, 16, 40
    (gpu,) = memplan.plan_chat_eval(rows, 1, new, TINY, target="cuda", prompt_tokens=prompt)
    (cpu,) = memplan.plan_chat_eval(rows, 1, new, TINY, target="cpu", prompt_tokens=prompt)
    per_slot = 2 * TINY.n_layer * TINY.n_kv_head * TINY.get_head_dim()  # keys + values
    bs = BLOCK_SIZE
    # a GPU much larger than the call: the budget is what every row could need (whole blocks of prompt + new
    # tokens) plus a spare block per row, and the pool (+ the scratch block) is allocated at once, in bf16
    need = rows * (-(-(prompt + new) // bs) * bs + bs)
    assert gpu.settings["kv_budget_tokens"] == need and gpu.settings["first_admitted_rows"] == rows
    assert gpu.breakdown["kv_cache"] == per_slot * (1 + need // bs) * bs * 2
    assert cpu.breakdown["kv_cache"] == 2 * gpu.breakdown["kv_cache"]  # fp32 on the CPU


def test_engine_kv_pool_takes_what_the_gpu_leaves():
    """With a GPU too small for every row at once, the engine's budget is KV_MEMORY_FRACTION of it minus what is
    in use and the activation reserve: the plan then fits (with 10% headroom) by construction; rows that outgrow
    it later are preempted and recomputed (tests/test_engine_memory.py)."""
    rows, prompt, new = 64, 16, 400
    per_token = kv_bytes_per_token(TINY, torch.bfloat16)
    (roomy,) = memplan.plan_chat_eval(rows, 1, new, TINY, target="cuda", prompt_tokens=prompt)
    small_gib = (roomy.total - roomy.breakdown["kv_cache"] + activation_reserve_bytes(TINY, rows)
                 + rows * (prompt + new) * per_token / 4) / KV_MEMORY_FRACTION / memplan.GIB
    (tight,) = memplan.plan_chat_eval(rows, 1, new, TINY, target="cuda", prompt_tokens=prompt,
                                      gpu_memory_gib=small_gib)
    budget = tight.settings["kv_budget_tokens"]
    assert rows * (prompt + new) / 5 < budget < rows * (prompt + new) / 2  # a quarter + the peak activations
    assert tight.breakdown["kv_cache"] <= (budget + BLOCK_SIZE) * per_token
    assert tight.fits(small_gib)


def test_cuda_autocast_imposes_fp32_norms_and_bf16_matmuls():
    x = torch.randn(2, 8)
    w = torch.randn(4, 8)
    with memplan.cuda_autocast():
        y = F.linear(x, w)
        assert y.dtype == torch.bfloat16
        assert F.rms_norm(y, (4,)).dtype == torch.float32  # CPU autocast alone would give bf16
        assert y.square().dtype == torch.float32 and F.softmax(y, -1).dtype == torch.float32
    assert F.rms_norm(y, (4,)).dtype == torch.bfloat16  # outside: untouched


def test_gpu_plan_grows_with_the_batch_and_fits_answers():
    small = _peak(pretrain_plan(TrainConfig(depth=2, device_batch_size=2, max_seq_len=64), TINY))
    large = _peak(pretrain_plan(TrainConfig(depth=2, device_batch_size=8, max_seq_len=64), TINY))
    assert large > small
    plan = memplan.PhasePlan("x", "train", {}, dict.fromkeys(memplan.CATEGORIES, 0) | {"activations": 9 * memplan.GIB})
    assert plan.fits(10.0, headroom=0.1) and not plan.fits(10.0, headroom=0.11)


def test_refusal_is_one_line_naming_the_flag():
    plan = memplan.PhasePlan("chat_rl", "rollout", {}, dict.fromkeys(memplan.CATEGORIES, 0) | {"kv_cache": 90 * 2**30})
    with pytest.raises(UserError) as e:
        memplan.check_fits([plan], 80.0, "--max-new-tokens")
    message = str(e.value)
    assert "\n" not in message and "--max-new-tokens" in message and "chat_rl rollout needs 90.0 GiB" in message


def test_auto_device_batch_size_is_the_largest_power_of_two_that_fits():
    plan_of = lambda b: [memplan.PhasePlan("s", "train", {}, dict.fromkeys(memplan.CATEGORIES, 0)
                                           | {"activations": b * memplan.GIB})]
    resolve = memplan.resolve_device_batch_size
    assert resolve(memplan.AUTO, 32, plan_of, 10.0) == 8  # 8 GiB <= 90% of 10 GiB < 16 GiB
    assert resolve(memplan.AUTO, 32, plan_of, 10.0, allowed=lambda b: b != 8) == 4
    assert resolve(4, 32, plan_of, 10.0) == 4
    with pytest.raises(UserError, match="lower --device-batch-size"):
        resolve(16, 32, plan_of, 10.0)
    with pytest.raises(UserError, match="even --device-batch-size 1 does not fit"):
        resolve(memplan.AUTO, 32, plan_of, 0.5)
    assert resolve(memplan.AUTO, 32, plan_of, None) == 32 and resolve(64, 32, plan_of, None) == 64  # no GPU
    assert memplan.detected_gpu_memory(torch.device("cpu")) is None


def test_cpu_stages_keep_their_defaults():
    assert TrainConfig().device_batch_size == memplan.AUTO and SFTConfig().device_batch_size == memplan.AUTO
    resolved = pretrain_resolve(TrainConfig(max_seq_len=64), TINY, torch.device("cpu"), world_size=2)
    assert resolved.device_batch_size == 32  # the fixed tokens per step are untouched: only accumulation follows
    assert resolved.total_batch_size == TrainConfig().total_batch_size
    explicit = pretrain_resolve(TrainConfig(max_seq_len=64, device_batch_size=4), TINY, torch.device("cpu"), 1)
    assert explicit.device_batch_size == 4 and explicit.total_batch_size == TrainConfig().total_batch_size


def test_plan_memory_cli_and_qwen_presets(capsys):
    from scripts.plan_memory import main, preset_config

    for name, params in (("qwen3-0.6b", 596e6), ("qwen3-1.7b", 1.72e9)):  # published sizes (tied embeddings)
        with torch.device("meta"):
            assert abs(GPT(preset_config(name)).num_params() / params - 1) < 0.01
    main(["chat_eval", "--model", "d2", "--max-tokens", "16", "--batch-size", "2", "--prompt-tokens", "8"])
    out = capsys.readouterr().out
    assert "| chat_eval | eval |" in out and out.strip().splitlines()[-1].startswith("RESULT fits=1/1")
    with pytest.raises(SystemExit):  # does not fit: exit code 1
        main(["chat_eval", "--model", "d2", "--gpu-memory-gib", "0.001", "--max-tokens", "16", "--batch-size", "2"])
    with pytest.raises(UserError, match="--model d0x"):
        main(["chat_eval", "--model", "d0x"])


def test_attention_calls_are_counted_inside_the_model_forward():
    from reasoning.flash_attention import CALLS

    with torch.device("meta"):
        model = GPT(TINY)
    model.to_empty(device="cpu")
    model.init_weights()
    before = dict(CALLS)
    model(torch.zeros((1, 8), dtype=torch.long))
    assert CALLS["sdpa"] - before["sdpa"] == TINY.n_layer and CALLS["fa3"] == before["fa3"]  # CPU: SDPA per layer


def test_gpu_check_reads_the_stage_outputs():
    from dev.gpu_check import check_row, parse_plan, parse_result, stage_commands

    output = ("memory plan: rollout 3.2 GiB, train 61.5 GiB, eval 4.0 GiB of 80 GiB per GPU\n"
              "RESULT accuracy=0.5 max_mem_gib=55.0000 attn_fa3=240 attn_sdpa=0\n")
    assert parse_plan(output) == 61.5 and parse_plan("no plan") is None
    result = parse_result(output)
    assert result["attn_fa3"] == "240" and parse_result("") == {}
    row = check_row("chat_sft", result, 61.5, cuda=True, hopper=True)
    assert row["ok"] and abs(row["ratio"] - 55 / 61.5) < 1e-9
    assert not check_row("chat_sft", result | {"max_mem_gib": "70"}, 61.5, True, True)["ok"]  # over the plan
    assert not check_row("chat_sft", result | {"attn_sdpa": "3"}, 61.5, True, True)["ok"]  # SDPA inside the model
    assert check_row("chat_sft", {"steps": "2"}, None, cuda=False, hopper=False)["ok"]  # CPU dry run: it ran
    assert [stage for stage, _ in stage_commands(micro=False)] == ["base_train", "chat_sft", "chat_rl", "chat_eval"]
    assert "--depth 20 --max-seq-len 2048" in stage_commands(micro=False)[0][1]


def test_attention_counter_never_makes_a_compiled_forward_recompile():
    import torch._dynamo

    from reasoning.flash_attention import CALLS, attention

    graphs = []

    def counting_backend(gm, example_inputs):  # called once per (re)compilation
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda q: attention(q, q, q), backend=counting_backend, fullgraph=True)
    before = dict(CALLS)
    for _ in range(3):
        compiled(torch.randn(1, 4, 2, 8))
    assert len(graphs) == 1
    assert CALLS == before  # compiled calls are not counted (eager forwards are)
