"""Pretraining loop: exact gradient accumulation, bitwise resume, learning, divergence handling, compile, fp8, CLI."""

import json
import os
import shutil
import time

import pytest
import torch

from reasoning import checkpoint as ckpt
from reasoning.common import UserError, run_main
from reasoning.gpt import GPT, config_from_depth
from reasoning.pretrain import TrainConfig, add_train_args, config_from_args, muon_momentum, train
from reasoning.training import NonFiniteLossError, StepBoundary, accumulate_gradients, lr_multiplier


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(corpus, base_dir, **overrides) -> TrainConfig:
    """depth 1, width 32, 32-token rows: a few ms per step."""
    values = dict(depth=1, aspect_ratio=32, max_seq_len=32, device_batch_size=2, num_iterations=6,
                  eval_every=-1, sample_every=-1, log_every=100, data_dir=corpus.data_dir,
                  tokenizer_dir=corpus.tokenizer_dir, base_dir=str(base_dir), device="cpu")
    values.update(overrides)
    # one micro-batch per step unless a test asks for more (the 2**19-token default is for real runs)
    values.setdefault("total_batch_size", values["device_batch_size"] * values["max_seq_len"])
    return TrainConfig(**values)


# ------------------------------------------------------------------------------------------------ schedules

def test_lr_schedule_warmup_constant_warmdown():
    n = 100  # 10 warmup steps, 20 warmdown steps to 0.1
    mults = [lr_multiplier(s, n, 0.1, 0.2, 0.1) for s in range(n + 1)]
    assert mults[0] == pytest.approx(0.1) and mults[9] == pytest.approx(1.0)  # (s+1)/10
    assert all(m == 1.0 for m in mults[10:80])
    assert mults[80] == pytest.approx(1.0) and mults[90] == pytest.approx(0.55) and mults[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(mults[80:], mults[81:]))  # monotone warmdown
    assert [lr_multiplier(s, 10, 0.0, 0.0, 0.0) for s in range(10)] == [1.0] * 10


def test_muon_momentum_ramp():
    assert muon_momentum(0, 0.85, 0.95, 300) == pytest.approx(0.85)
    assert muon_momentum(150, 0.85, 0.95, 300) == pytest.approx(0.90)
    assert muon_momentum(300, 0.85, 0.95, 300) == muon_momentum(10_000, 0.85, 0.95, 300) == pytest.approx(0.95)


# ------------------------------------------------------------------------------------------------ accumulation

def _random_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config_from_depth(1, 64, max_seq_len=16, aspect_ratio=32))
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would give zero gradients upstream; make every grad real
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_accumulation_equals_one_big_batch_with_uneven_targets():
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 64, (6, 16), generator=gen)
    targets = torch.randint(0, 64, (6, 16), generator=gen)
    targets[0:2, 3:] = -1  # micro-batch 0: 6 valid targets
    targets[2, ::2] = -1  # micro-batch 1: 24 valid; micro-batch 2: all 32 valid
    micro = [(inputs[i:i + 2], targets[i:i + 2]) for i in (0, 2, 4)]

    big = _random_model()
    big_loss = big(inputs, targets)  # mean over the 62 valid targets of one batch
    big_loss.backward()

    acc = _random_model()
    acc_loss = accumulate_gradients(acc, micro)
    assert acc_loss.item() == pytest.approx(big_loss.item(), rel=1e-6)
    for (name, p_big), p_acc in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p_acc.grad, p_big.grad, rtol=1e-5, atol=1e-7, msg=name)

    # the test can tell: averaging per-micro-batch means (the naive accumulation) gives different gradients
    naive = _random_model()
    for x, y in micro:
        (naive(x, y) / len(micro)).backward()
    assert not torch.allclose(naive.lm_head.weight.grad, big.lm_head.weight.grad, rtol=1e-3, atol=0)


def test_accumulation_rejects_all_ignored():
    model = _random_model()
    x = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="no valid targets"):
        accumulate_gradients(model, [(x, torch.full((1, 16), -1))])


# ------------------------------------------------------------------------------------------------ exact resume

def _final_state(base_dir, tag):
    state, _, _ = ckpt.load_checkpoint(ckpt.checkpoint_dir("base", tag, str(base_dir)))
    return state


def test_exact_resume_is_bitwise(tiny_corpus, tmp_path):
    # 2 accumulation steps, clipping, lr warmup/warmdown and momentum ramp all active across the stop point
    common = dict(num_iterations=6, total_batch_size=2 * 2 * 32, grad_clip=0.3, warmup_ratio=0.34,
                  warmdown_ratio=0.5, final_lr_frac=0.1, muon_momentum_warmup=4, tag="t")
    straight = train(tiny_config(tiny_corpus, tmp_path / "a", **common))
    first = train(tiny_config(tiny_corpus, tmp_path / "b", stop_at_step=3, **common))
    assert not first["finished"] and first["step"] == 3
    resumed = train(tiny_config(tiny_corpus, tmp_path / "b", resume=True, **common))
    assert resumed["finished"]

    assert [s for s, _ in first["losses"] + resumed["losses"]] == list(range(1, 7))
    assert first["losses"] + resumed["losses"] == straight["losses"]  # bitwise: float equality
    # the packing counters travel in the loader state: the resumed run reports the whole run's utilisation
    assert resumed["metrics"]["pack_utilization"] == straight["metrics"]["pack_utilization"]
    assert first["metrics"]["pack_utilization"] != straight["metrics"]["pack_utilization"]
    a, b = _final_state(tmp_path / "a", "t"), _final_state(tmp_path / "b", "t")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_device_batch_size_does_not_change_the_optimisation(tiny_corpus, tmp_path):
    """--total-batch-size is tokens per step: 4, 2 or 1 rows per micro-batch give 1, 2 or 4 micro-batches of the
    same rows, hence the same loss curve (float tolerance: the sums are grouped differently)."""
    curves = {}
    for rows in (4, 2, 1):
        summary = train(tiny_config(tiny_corpus, tmp_path / str(rows), device_batch_size=rows,
                                    total_batch_size=4 * 32, num_iterations=4, grad_clip=0.3))
        curves[rows] = [loss for _, loss in summary["losses"]]
    assert len(curves[4]) == 4
    for rows in (2, 1):
        assert curves[rows] == pytest.approx(curves[4], rel=1e-4, abs=1e-5), (rows, curves)
    # not trivially equal: a smaller total batch (fewer rows per step) trains another curve
    other = train(tiny_config(tiny_corpus, tmp_path / "half", device_batch_size=2, total_batch_size=2 * 32,
                              num_iterations=4, grad_clip=0.3))
    assert max(abs(a - b) for (_, a), b in zip(other["losses"], curves[4])) > 1e-3


def test_resume_restores_rng_and_checks_layout(tiny_corpus, tmp_path):
    config = tiny_config(tiny_corpus, tmp_path, num_iterations=4, stop_at_step=2, tag="r")
    train(config)
    ckpt_dir = ckpt.checkpoint_dir("base", "r", str(tmp_path))
    meta_path = os.path.join(ckpt_dir, "meta_000002.json")
    with open(meta_path) as f:
        meta = json.load(f)
    torch.manual_seed(1234)  # an RNG state that training itself would never produce
    meta["rng"] = [ckpt.rng_state()]
    expected = torch.get_rng_state()
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    torch.manual_seed(0)
    train(tiny_config(tiny_corpus, tmp_path, num_iterations=4, resume=True, tag="r"))
    assert torch.equal(torch.get_rng_state(), expected)  # training draws nothing: the restored state survives

    with pytest.raises(UserError, match="data ranks"):
        train(tiny_config(tiny_corpus, tmp_path, num_iterations=4, resume=True, tag="r", simulate_ranks=2))
    with pytest.raises(UserError, match="same --depth"):
        train(tiny_config(tiny_corpus, tmp_path, num_iterations=4, resume=True, tag="r", depth=2))
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(tiny_config(tiny_corpus, tmp_path, resume=True, tag="never"))


# ------------------------------------------------------------------------------------------------ learning

LEARNING_BUDGET_S = 60  # issue 3: val bpb drops clearly "in <= 60 s"


@pytest.fixture(scope="module")
def trained_run(tiny_corpus, tmp_path_factory):
    """A depth-2 model trained for 60 steps on the synthetic corpus (shared by the learning and eval tests).
    summary["wall_seconds"]: the whole train() call, set-up and evaluations included."""
    base = tmp_path_factory.mktemp("trained")
    config = TrainConfig(depth=2, aspect_ratio=32, max_seq_len=64, device_batch_size=8, total_batch_size=8 * 64,
                         num_iterations=60,
                         eval_every=30, eval_tokens=8 * 64 * 8, sample_every=0, sample_tokens=8, log_every=20,
                         save_every=30, tag="learn", data_dir=tiny_corpus.data_dir,
                         tokenizer_dir=tiny_corpus.tokenizer_dir, base_dir=str(base), device="cpu")
    start = time.perf_counter()
    summary = train(config)
    return config, summary | {"wall_seconds": time.perf_counter() - start}


def test_learning_drops_val_bpb(trained_run):
    config, summary = trained_run
    print(f"learning run: {summary['wall_seconds']:.1f} s wall for {summary['step']} steps")
    # measured ~4 s here; a third of the budget leaves 3x headroom for a loaded CI box, so this cannot flake
    assert summary["wall_seconds"] < LEARNING_BUDGET_S / 3, summary["wall_seconds"]
    m = summary["metrics"]
    assert [s for s, _ in summary["series"]["val_bpb"]] == [0, 30, 60]
    assert m["initial_val_bpb"] > 3.0  # ~uniform over 512 tokens of ~2 bytes each: log2(512)/2 ≈ 4.5 bits/byte
    assert m["val_bpb"] < 0.6 * m["initial_val_bpb"], m
    assert m["min_val_bpb"] == min(v for _, v in summary["series"]["val_bpb"])
    assert m["tok_per_s"] > 0 and 0 < m["mfu"] < 1
    assert len(summary["samples"]) == len(config.sample_prompts)

    with open(os.path.join(config.base_dir, "logs", "base_learn.jsonl")) as f:
        records = [json.loads(line) for line in f]
    step_losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert step_losses == summary["losses"]
    # packing utilisation: in every step record, and the last one is the run's figure
    packs = [r["pack_util"] for r in records if "loss" in r]
    assert len(packs) == 60 and all(0.5 < p <= 1 for p in packs)
    assert packs[-1] == m["pack_utilization"]
    ckpt_dir = ckpt.checkpoint_dir("base", "learn", config.base_dir)
    assert ckpt.find_last_step(ckpt_dir) == 60
    assert os.path.exists(os.path.join(ckpt_dir, "meta_000030.json"))  # keep_last=2 keeps the periodic one too


# ------------------------------------------------------------------------------------------------ divergence

def _inject_nan_at(monkeypatch, call: int, where: str):
    """Make the `call`-th optimizer step see a NaN loss or an infinite gradient (a fault the loop must catch)."""
    import reasoning.pretrain as pretrain

    real = pretrain.accumulate_gradients
    calls = {"n": 0}

    def faulty(model, micro_batches, autocast=None):
        loss = real(model, micro_batches, autocast)
        calls["n"] += 1
        if calls["n"] == call:
            if where == "loss":
                return torch.tensor(float("nan"))
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    monkeypatch.setattr(pretrain, "accumulate_gradients", faulty)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_stops_and_keeps_last_checkpoint(tiny_corpus, tmp_path, monkeypatch, where):
    _inject_nan_at(monkeypatch, 4, where)
    config = tiny_config(tiny_corpus, tmp_path, num_iterations=8, save_every=2, tag="nan")
    with pytest.raises(NonFiniteLossError, match="step 3: .*last good checkpoint.* step 2"):
        train(config)
    ckpt_dir = ckpt.checkpoint_dir("base", "nan", str(tmp_path))
    assert ckpt.find_last_step(ckpt_dir) == 2
    state, _, _ = ckpt.load_checkpoint(ckpt_dir)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_script_exit_code_on_non_finite(tiny_corpus, tmp_path, monkeypatch, capsys):
    from scripts.base_train import main

    _inject_nan_at(monkeypatch, 2, "loss")
    argv = ["--", "--depth", "1", "--aspect-ratio", "32", "--max-seq-len", "32", "--device-batch-size", "2",
            "--total-batch-size", "64",
            "--num-iterations", "5", "--eval-every", "-1", "--sample-every", "-1", "--data-dir", tiny_corpus.data_dir,
            "--tokenizer-dir", tiny_corpus.tokenizer_dir, "--base-dir", str(tmp_path), "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: main(argv))
    assert exc.value.code == 3
    assert "error: step 1: loss nan" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tmp_path, "report", "base_train.json"))  # no success report


def test_script_without_eval_reports_what_it_measured(tiny_corpus, tmp_path, capsys):
    """--eval-every -1: no val bpb is measured, so the RESULT line says `na` and the report leaves it out;
    packing utilisation shows in the progress line and the report."""
    from scripts.base_train import main

    argv = ["--depth", "1", "--aspect-ratio", "32", "--max-seq-len", "32", "--device-batch-size", "2",
            "--total-batch-size", "64",
            "--num-iterations", "3", "--eval-every", "-1", "--sample-every", "-1", "--data-dir", tiny_corpus.data_dir,
            "--tokenizer-dir", tiny_corpus.tokenizer_dir, "--base-dir", str(tmp_path), "--device", "cpu"]
    run_main(lambda: main(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    result = dict(item.split("=", 1) for item in lines[-1].split()[1:])
    assert lines[-1].startswith("RESULT ") and result["val_bpb"] == "na" and result["steps"] == "3"
    assert float(result["tok_per_s"]) > 0
    step_lines = [line for line in lines if line.startswith("step 00003/3 ")]
    assert len(step_lines) == 1 and " | pack " in step_lines[0] and "%" in step_lines[0].split(" | pack ")[1]
    with open(os.path.join(tmp_path, "report", "base_train.json")) as f:
        metrics = json.load(f)["metrics"]
    assert not {"val_bpb", "initial_val_bpb", "min_val_bpb"} & set(metrics)  # not measured: not invented
    assert 0.5 < metrics["pack_utilization"] <= 1
    shown = float(step_lines[0].split(" | pack ")[1].split("%")[0])
    assert shown == pytest.approx(100 * metrics["pack_utilization"], abs=0.05)


def test_unknown_compile_backend_is_a_user_error_before_training(tiny_corpus, tmp_path, capsys):
    import torch._dynamo

    from scripts.base_train import main

    config = tiny_config(tiny_corpus, tmp_path, compile=True, compile_backend="nope")
    with pytest.raises(UserError, match="--compile-backend 'nope': not a torch.compile backend; expected one of "
                                        ".*inductor.*aot_eager") as err:
        train(config)
    assert all(b in str(err.value) for b in torch._dynamo.list_backends())
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: main(["--compile", "--compile-backend", "nope", "--base-dir", str(tmp_path),
                               "--tokenizer-dir", tiny_corpus.tokenizer_dir, "--data-dir", tiny_corpus.data_dir]))
    assert exc.value.code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: --compile-backend 'nope'")
    assert not os.path.exists(os.path.join(tmp_path, "logs"))  # stopped before the run started
    # without --compile the backend flag is unused, and a debug backend is accepted
    TrainConfig(compile_backend="nope").validate()
    TrainConfig(compile=True, compile_backend="aot_eager").validate()


# ------------------------------------------------------------------------------------------------ compile, fp8

@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "aot_eager",  # traces exactly like inductor at the dynamo level (where recompiles happen), no C++ build
    pytest.param("inductor", marks=pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                                       reason="inductor on CPU needs a C++ compiler")),
])
def test_compile_matches_eager_without_recompiles(tiny_corpus, tmp_path, backend):
    """--compile's default backend (inductor: generated C++ on CPU) and aot_eager reproduce eager's losses."""
    import torch._dynamo

    # lr changes every step (warmdown) and momentum ramps: neither may cause a recompile
    common = dict(num_iterations=4, warmdown_ratio=0.75, muon_momentum_warmup=3)
    eager = train(tiny_config(tiny_corpus, tmp_path / "eager", **common))
    torch._dynamo.reset()
    # config.patch, not monkeypatch: monkeypatch's undo deletes the option, which hides it from later compiles
    # (test_fp8's compile test then fails with "error_on_recompile does not exist")
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = train(tiny_config(tiny_corpus, tmp_path / "compiled", compile=True, compile_backend=backend,
                                     **common))
    torch._dynamo.reset()
    eager_losses = [v for _, v in eager["losses"]]
    compiled_losses = [v for _, v in compiled["losses"]]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)  # measured: inductor within 8e-8


def test_fp8_training_tracks_fp32(tiny_corpus, tmp_path):
    # small rows: CPU fp8 matmuls (torch._scaled_mm) cost ~0.2 s a call on some Xeons (2026-12: 4x64-token rows x 50
    # steps took 203 s); 2x32 x 30 steps still drops the loss by ~2.5 and separates fp8 from fp32
    common = dict(depth=2, max_seq_len=32, device_batch_size=2, num_iterations=30, fp8_min_dim=16)
    fp32 = train(tiny_config(tiny_corpus, tmp_path / "fp32", **common))
    fp8 = train(tiny_config(tiny_corpus, tmp_path / "fp8", fp8=True, **common))
    assert fp8["fp8_layers"] == 2 * 6  # q, k, v, proj, fc, mlp proj per block (dims 64/256 are multiples of 16)
    assert fp32["fp8_layers"] == 0
    tail = slice(-10, None)  # the last 10 steps, so one noisy batch does not decide
    loss32 = sum(v for _, v in fp32["losses"][tail]) / 10
    loss8 = sum(v for _, v in fp8["losses"][tail]) / 10
    assert fp32["losses"][0][1] - loss32 > 1.0  # both actually trained
    assert abs(loss8 - loss32) < 0.05 * loss32, (loss8, loss32)
    assert fp8["losses"] != fp32["losses"]  # fp8 really was in the loop


# ------------------------------------------------------------------------------------------------ CLI and eval

def test_cli_flags_map_to_config():
    import argparse

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    config = config_from_args(parser.parse_args(["--depth", "3", "--compile", "--run", "x", "--matrix-lr", "0.01",
                                                 "--total-batch-size", "4096", "--head-dim", "16"]))
    assert (config.depth, config.compile, config.run, config.matrix_lr) == (3, True, "x", 0.01)
    assert (config.total_batch_size, config.head_dim, config.fp8, config.tag) == (4096, 16, False, None)


def test_every_trainer_cli_round_trips_its_config():
    """The shared dataclass -> argparse plumbing (reasoning.training): no flags give the dataclass defaults, every
    field with a flag has exactly one, shared fields included; RL booleans also take --no-X."""
    import argparse

    from reasoning.checkpoint import add_model_args
    from reasoning.rl import RLConfig, add_rl_args
    from reasoning.rl import config_from_args as rl_from_args
    from reasoning.sft import SFTConfig, add_sft_args
    from reasoning.sft import config_from_args as sft_from_args

    for cls, add, parse, source_stage in [(TrainConfig, add_train_args, config_from_args, None),
                                          (SFTConfig, add_sft_args, sft_from_args, "base"),
                                          (RLConfig, add_rl_args, rl_from_args, "sft")]:
        parser = argparse.ArgumentParser()
        if source_stage:  # as the scripts do: the model-source flags come from reasoning.checkpoint
            add_model_args(parser, source_stage)
        add(parser)
        assert parse(parser.parse_args([])).to_dict() == cls().to_dict(), cls.__name__
        flags = {a.dest for a in parser._actions}
        with_flag = {f for f in cls().to_dict() if f not in ("sample_prompts", "stage", "tag", "step", "init_from")}
        assert with_flag <= flags and {"matrix_lr", "grad_clip", "keep_last", "base_dir"} <= flags, cls.__name__
    parser = argparse.ArgumentParser()
    add_model_args(parser, "sft")
    add_rl_args(parser)
    rl = rl_from_args(parser.parse_args(["--no-std-normalize", "--resume", "--tag", "t", "--lr-scale", "0.1"]))
    assert (rl.std_normalize, rl.resume, rl.tag, rl.lr_scale, RLConfig().lr_scale) == (False, True, "t", 0.1, 0.05)
    assert TrainConfig().to_dict()["sample_prompts"] == list(TrainConfig().sample_prompts)  # JSON-ready


def test_step_boundary_schedules_evals_and_saves():
    def steps(every, kind, num_steps=10, stop_at=-1, resumed_at=None, first=0):
        return [s for s in range(first, num_steps + 1)
                if getattr(StepBoundary(s, num_steps, stop_at, resumed_at), kind)(every)]

    assert steps(4, "evaluate_due") == [0, 4, 8, 10] and steps(0, "evaluate_due") == [0, 10]
    assert steps(-1, "evaluate_due") == [] and steps(4, "save_due") == [4, 8, 10] and steps(0, "save_due") == [10]
    assert steps(4, "save_due", stop_at=6) == [4, 6, 8, 10]                    # a time slice ends with a save
    assert steps(4, "evaluate_due", resumed_at=4, first=4) == [8, 10]          # done before the checkpoint
    assert StepBoundary(6, 10, stop_at_step=6).last and not StepBoundary(6, 10).last


def test_bad_settings_are_user_errors(tiny_corpus, tmp_path):
    with pytest.raises(UserError, match="--total-batch-size 100: expected a multiple of .* = 64"):
        train(tiny_config(tiny_corpus, tmp_path, total_batch_size=100))
    with pytest.raises(UserError, match="--warmdown-ratio 1.5"):
        train(tiny_config(tiny_corpus, tmp_path, warmdown_ratio=1.5))
    with pytest.raises(UserError, match="--tokenizer-dir"):
        train(tiny_config(tiny_corpus, tmp_path, tokenizer_dir=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="--vocab-size 100: smaller than the tokenizer's 512"):
        train(tiny_config(tiny_corpus, tmp_path, vocab_size=100))


def test_iterations_from_param_data_ratio(tiny_corpus, tmp_path):
    config = tiny_config(tiny_corpus, tmp_path, num_iterations=-1, target_param_data_ratio=0.01, stop_at_step=0)
    summary = train(config)
    model = GPT(config_from_depth(1, tiny_corpus.vocab_size, max_seq_len=32, aspect_ratio=32))
    non_embedding = model.num_params() - model.wte.weight.numel()
    assert summary["num_iterations"] == round(0.01 * non_embedding / 64)


def test_padded_vocab_and_no_checkpoints(tiny_corpus, tmp_path):
    summary = train(tiny_config(tiny_corpus, tmp_path, num_iterations=2, vocab_size=640, save_every=-1, tag="pad"))
    assert summary["model_config"]["vocab_size"] == 640 and summary["finished"]
    assert ckpt.find_last_step(ckpt.checkpoint_dir("base", "pad", str(tmp_path))) == -1


def test_base_eval_reproduces_final_val_bpb(trained_run, capsys):
    from scripts.base_eval import main

    config, summary = trained_run
    argv = ["--init-from", ckpt.checkpoint_dir("base", "learn", config.base_dir), "--data-dir", config.data_dir,
            "--device-batch-size", "8", "--max-seq-len", "64", "--eval-tokens", str(config.eval_tokens),
            "--sample-tokens", "4", "--base-dir", config.base_dir, "--device", "cpu"]
    run_main(lambda: main(argv))
    out = capsys.readouterr().out
    bundle = os.path.join(config.base_dir, "eval_bundle")
    assert f"skipped: no eval bundle at {bundle}" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT val_bpb=")
    assert float(last.split()[1].split("=")[1]) == pytest.approx(summary["metrics"]["val_bpb"], abs=1e-4)
    assert " core=na " in f"{last} "  # CORE not measured, and the RESULT line says so
    with open(os.path.join(config.base_dir, "report", "base_eval.json")) as f:
        section = json.load(f)
    assert section["metrics"]["val_bpb"] == pytest.approx(summary["metrics"]["val_bpb"], rel=1e-9)
    assert section["metrics"]["core"] is None  # report.md: "not measured"
    assert section["tables"]["CORE"][0]["status"] == "skipped" and bundle in section["tables"]["CORE"][0]["reason"]


# ------------------------------------------------------------------------------------------------ model flags

def test_init_from_specs(trained_run, tmp_path):
    import argparse

    config, _ = trained_run
    assert ckpt.parse_init_from("sft:d12@500") == ("sft", "d12", 500)
    assert ckpt.parse_init_from("base:d4") == ("base", "d4", None)
    assert ckpt.parse_init_from("rl") == ("rl", None, None)
    assert ckpt.parse_init_from(str(tmp_path)) == (str(tmp_path), None, None)
    for bad, message in (("hf:/no/such/model", "no such directory"), ("sft:d12@last", "numeric STEP"),
                         ("nowhere/at/all", "no such directory"), ("base:", "TAG")):
        with pytest.raises(UserError, match=message):
            ckpt.parse_init_from(bad)

    parser = argparse.ArgumentParser()
    ckpt.add_model_args(parser, default_stage="base")
    args = parser.parse_args(["--tag", "learn", "--step", "30"])
    model, tokenizer, meta = ckpt.load_model_from_args(args, device="cpu", base_dir=config.base_dir)
    assert meta["step"] == 30 and tokenizer.vocab_size == model.config.vocab_size and not model.training
    args = parser.parse_args(["--init-from", "base:learn", "--step", "30"])  # --init-from wins: the last step
    assert ckpt.load_model_from_args(args, base_dir=config.base_dir)[2]["step"] == 60


def test_base_eval_runs_core_when_a_bundle_exists(trained_run, core_bundle, capsys):
    from scripts.base_eval import main

    config, _ = trained_run
    argv = ["--tag", "learn", "--data-dir", config.data_dir, "--device-batch-size", "8", "--eval-tokens", "512",
            "--sample-tokens", "0", "--eval-bundle", core_bundle[0], "--core-max-per-task", "3",
            "--base-dir", config.base_dir, "--device", "cpu"]
    run_main(lambda: main(argv))
    out = capsys.readouterr().out
    assert "skipped" not in out and "CORE:" in out
    assert out.strip().splitlines()[-1].startswith("RESULT val_bpb=") and " core=" in out.strip().splitlines()[-1]
    with open(os.path.join(config.base_dir, "report", "base_eval.json")) as f:
        section = json.load(f)
    assert [r["task"] for r in section["tables"]["core tasks"]] == ["count", "legs", "days"]
    assert all(r["examples"] == 3 for r in section["tables"]["core tasks"])


# ------------------------------------------------------------------------------------------------ MFU

def test_peak_flops_table_and_cpu_measurement():
    from reasoning.mfu import gpu_peak_flops, measure_cpu_matmul_flops, model_flops_utilization, peak_flops

    h100_sxm = "NVIDIA H100 80GB HBM3"
    assert gpu_peak_flops(h100_sxm) == 989e12 and gpu_peak_flops(h100_sxm, fp8=True) == 1979e12
    assert gpu_peak_flops("NVIDIA H200") == gpu_peak_flops(h100_sxm)
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12  # the PCIe card is slower than the SXM part
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", fp8=True) is None  # Ampere has no fp8 units
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090") == 165e12 and gpu_peak_flops("Some Future GPU") is None
    peak = peak_flops("cpu")
    assert 1e8 < peak < 1e14 and peak_flops("cpu") == peak  # measured once per process, then cached
    assert measure_cpu_matmul_flops.cache_info().hits >= 1
    assert model_flops_utilization(1e6, 2e3, 4e9, num_devices=1) == pytest.approx(0.5)
    assert model_flops_utilization(1e6, 2e3, 4e9, num_devices=2) == pytest.approx(0.25)
    assert model_flops_utilization(1e6, 2e3, None) is None
