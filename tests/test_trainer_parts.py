"""The trainer loop's shared parts (reasoning.training, reasoning.cli, reasoning.optim.OptimizerSettings) that
scripts/base_train.py, chat_sft.py and chat_rl.py call: clipping, the LR write, the reported train loss, flags
without a hidden special case, the optimizer's settings from a config, SFT's micro-batch rows."""

import argparse

import pytest
import torch

from reasoning.common import UserError
from reasoning.optim import OptimizerSettings
from reasoning.pretrain import TrainConfig
from reasoning.sft import SFTConfig, micro_batch_rows
from reasoning.training import (NonFiniteLossError, check_step_finite, clip_gradients, final_train_loss,
                                gradient_norm, set_learning_rate)


def model_with_grads(scale: float, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale
    model[1].bias.grad = None  # a parameter without a gradient is skipped
    return model


def grads(model) -> list:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("scale", [0.01, 3.0])
def test_clip_gradients_on_the_device_is_torchs_clip_grad_norm(scale):
    model = model_with_grads(scale)
    reference = model_with_grads(scale)  # the same gradients (same seed)
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    norm = clip_gradients(model, 1.0)
    assert torch.equal(norm, expected_norm)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(grads(model), grads(reference)))


@pytest.mark.parametrize("scale", [0.01, 3.0])
def test_clip_gradients_with_the_host_norm_scales_only_above_the_limit(scale):
    model = model_with_grads(scale)
    before = grads(model)
    norm = float(gradient_norm(model))
    assert norm == pytest.approx(torch.cat([g.flatten() for g in before if g is not None]).norm().item(), rel=1e-5)
    assert clip_gradients(model, 1.0, host_norm=norm) == norm
    after = grads(model)
    if norm <= 1.0:
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(before, after))
    else:
        assert float(gradient_norm(model)) == pytest.approx(1.0, rel=1e-5)
        assert all(a is None or torch.equal(b, a * (1.0 / (norm + 1e-6))) for a, b in zip(before, after))


def test_clip_gradients_zero_means_off_both_ways():
    for host in (False, True):
        model = model_with_grads(5.0)
        before = grads(model)
        norm = clip_gradients(model, 0.0, host_norm=float(gradient_norm(model)) if host else None)
        assert float(norm) > 1.0
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(before, grads(model)))


def test_set_learning_rate_scales_every_group_from_its_initial_rate():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 0.5}, {"params": [model.bias], "lr": 0.1}])
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    set_learning_rate(optimizer, 0.25)
    set_learning_rate(optimizer, 0.5)  # from the initial rate, not compounded
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.05]


def test_check_step_finite_names_the_step_and_what_diverged(tmp_path):
    check_step_finite(3, 1.5, 0.2, str(tmp_path), "run")
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan, gradient norm 0.2: .* Try a lower --lr-scale"):
        check_step_finite(3, float("nan"), 0.2, str(tmp_path), "run", hint="a lower --lr-scale")
    with pytest.raises(NonFiniteLossError, match="gradient norm inf"):
        check_step_finite(3, 1.0, float("inf"), str(tmp_path), "run")


def test_final_train_loss_is_the_mean_of_the_last_fifth_of_the_steps():
    assert final_train_loss([]) is None
    assert final_train_loss([[1, 4.0]]) == 4.0
    history = [[step, float(step)] for step in range(1, 11)]  # 10 steps: the last 2
    assert final_train_loss(history) == 9.5
    history = [[step, float(step)] for step in range(1, 201)]  # 200 steps: the last 20, not 40
    assert final_train_loss(history) == sum(range(181, 201)) / 20


def test_from_args_takes_only_flags_and_what_the_caller_passes():
    """A field without a flag of its own keeps its default even when the namespace happens to hold that name
    (there is no hidden special case), unless the caller passes it; the model-source flags are no config fields
    (they resolve to a checkpoint.ModelSource)."""
    from reasoning.checkpoint import add_model_args
    from scripts.chat_rl import RLConfig

    parser = argparse.ArgumentParser()
    add_model_args(parser, default_stage="sft")
    RLConfig.add_args(parser, negatable_booleans=True)
    args = parser.parse_args(["--stage", "base", "--tag", "t7", "--lr-scale", "0.5"])
    config = RLConfig.from_args(args)
    assert config.lr_scale == 0.5 and not hasattr(config, "stage") and not hasattr(config, "tag")
    parser = argparse.ArgumentParser()
    TrainConfig.add_args(parser)
    args = parser.parse_args([])
    args.sample_prompts = ("x",)  # a namespace holding a field that has no flag
    assert TrainConfig.from_args(args).sample_prompts == TrainConfig().sample_prompts
    assert TrainConfig.from_args(args, sample_prompts=("y",)).sample_prompts == ("y",)


def test_optimizer_settings_come_from_the_config():
    pre = TrainConfig(matrix_lr=0.03, weight_decay=0.1, adam_beta1=0.7, adam_beta2=0.9, muon_momentum_end=0.9)
    assert pre.optimizer_settings() == OptimizerSettings(matrix_lr=0.03, weight_decay=0.1, betas=(0.7, 0.9),
                                                         muon_momentum=0.9)
    sft = SFTConfig(lr_scale=0.5, matrix_lr=0.02, embedding_lr=0.2, lm_head_lr=0.004, scalar_lr=0.5)
    settings = sft.optimizer_settings()
    assert (settings.matrix_lr, settings.embedding_lr, settings.lm_head_lr, settings.scalar_lr) == \
        (0.02 * 0.5, 0.2 * 0.5, 0.004 * 0.5, 0.5 * 0.5)
    assert settings.betas == OptimizerSettings().betas  # SFT keeps the optimizer's default betas
    from helpers_models import tiny_model

    model = tiny_model(64, depth=1, n_embd=32, max_seq_len=16)
    groups = {g["name"]: g for g in model.setup_optimizer(pre.optimizer_settings()).param_groups}
    assert groups["matrix"]["lr"] == 0.03 and groups["matrix"]["momentum"] == 0.9
    assert groups["matrix"]["weight_decay"] == 0.1 and groups["embedding"]["betas"] == (0.7, 0.9)


def test_sft_micro_batch_rows_cut_each_ranks_share():
    assert micro_batch_rows(SFTConfig(total_batch_rows=32, device_batch_size=8), world_size=2) == [8, 8]
    assert micro_batch_rows(SFTConfig(total_batch_rows=20, device_batch_size=8), world_size=1) == [8, 8, 4]
    with pytest.raises(UserError, match="--total-batch-rows 6: expected a multiple of the world size 4"):
        micro_batch_rows(SFTConfig(total_batch_rows=6, device_batch_size=8), world_size=4)
