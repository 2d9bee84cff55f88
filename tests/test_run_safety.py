"""Issue 17, training side: a run never deletes or resumes another run's checkpoints, diverged weights are never
saved, a torn metrics line or a hand-edited / corrupted checkpoint is a one-line error or a notice (never a
traceback), and learning rates that overflow float32 are refused with the flags."""

import json
import os

import pytest
import torch

from reasoning import checkpoint as ckpt
from reasoning.common import UserError, run_main
from reasoning.pretrain import TrainConfig, train
from reasoning.training import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(corpus, base_dir, **overrides) -> TrainConfig:
    values = dict(depth=1, aspect_ratio=32, max_seq_len=32, device_batch_size=2, total_batch_size=64, num_iterations=4, eval_every=-1,
                  sample_every=-1, log_every=100, data_dir=corpus.data_dir, tokenizer_dir=corpus.tokenizer_dir,
                  base_dir=str(base_dir), device="cpu", tag="t")
    values.update(overrides)
    return TrainConfig(**values)


def base_argv(corpus, base_dir, *extra):
    return ["--depth", "1", "--aspect-ratio", "32", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64",
            "--eval-every", "-1", "--sample-every", "-1", "--data-dir", corpus.data_dir, "--tokenizer-dir",
            corpus.tokenizer_dir, "--base-dir", str(base_dir), "--device", "cpu", "--tag", "t", *extra]


def run_script(argv, capsys):
    """(exit code, stdout, stderr) of base_train with `argv`."""
    from scripts.base_train import main

    code = 0
    try:
        run_main(lambda: main(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def every_checkpoint_loads_and_is_finite(ckpt_dir) -> list[int]:
    steps = []
    for name in sorted(os.listdir(ckpt_dir)):
        if name.startswith("meta_"):
            step = int(name[5:11])
            state, optim, _ = ckpt.load_checkpoint(ckpt_dir, step, load_optimizer=True)
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), step
            steps.append(step)
    return steps


# ----------------------------------------------------------------------------------------------- run identity

def test_a_fresh_run_refuses_a_tag_holding_another_runs_checkpoints(tiny_corpus, tmp_path, capsys):
    """Issue 17.1: a 20-step run into a tag holding steps 50/60 of another run exited 0 and kept only 50 and 60."""
    ckpt_dir = ckpt.checkpoint_dir("base", "t", str(tmp_path))
    train(tiny(tiny_corpus, tmp_path, num_iterations=6, save_every=2))
    before = sorted(os.listdir(ckpt_dir))
    old_run = ckpt.checkpoint_runs(ckpt_dir)
    assert list(old_run.values()) == [[4, 6]]

    code, out, err = run_script(base_argv(tiny_corpus, tmp_path, "--num-iterations", "3"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: checkpoint tag t ") and "--resume" in err and "--overwrite" in err
    assert sorted(os.listdir(ckpt_dir)) == before  # nothing touched

    # --overwrite: a new run; the old one's checkpoints go at its first save, its own are kept
    summary = train(tiny(tiny_corpus, tmp_path, num_iterations=3, save_every=1, overwrite=True))
    runs = ckpt.checkpoint_runs(ckpt_dir)
    assert list(runs.values()) == [[2, 3]] and list(runs) != list(old_run)
    assert summary["finished"]
    # --resume continues the run that wrote last (this one), past its schedule -> an error, not the old run
    with pytest.raises(UserError, match="step 3, past --num-iterations 2"):
        train(tiny(tiny_corpus, tmp_path, num_iterations=2, resume=True))


def test_resume_continues_the_run_that_wrote_last_not_the_highest_step(tiny_corpus, tmp_path, monkeypatch):
    """Issue 17.1: a run killed at step 60 into a tag holding 275/300 'resumed at step 300' -- the other run."""
    ckpt_dir = ckpt.checkpoint_dir("base", "t", str(tmp_path))
    train(tiny(tiny_corpus, tmp_path / "other", num_iterations=8, save_every=4, tag="t"))
    os.makedirs(os.path.dirname(ckpt_dir))
    os.rename(ckpt.checkpoint_dir("base", "t", str(tmp_path / "other")), ckpt_dir)  # another run: steps 4, 8
    straight = train(tiny(tiny_corpus, tmp_path / "straight", num_iterations=6))
    with monkeypatch.context() as m:  # killed before its first save could delete the other run (--overwrite)
        m.setattr(ckpt, "_prune", lambda *args, **kwargs: None)
        first = train(tiny(tiny_corpus, tmp_path, num_iterations=6, save_every=1, stop_at_step=3, overwrite=True))
    assert not first["finished"] and [sorted(s) for s in ckpt.checkpoint_runs(ckpt_dir).values()] == [[4, 8],
                                                                                                     [1, 2, 3]]
    resumed = train(tiny(tiny_corpus, tmp_path, num_iterations=6, resume=True))
    assert first["losses"] + resumed["losses"] == straight["losses"]
    # this run pruned its own old steps (keep_last 2), and only those
    assert list(ckpt.checkpoint_runs(ckpt_dir).values()) == [[4, 8], [3, 6]]


def test_fine_tuning_refuses_an_occupied_out_tag(tiny_corpus, tmp_path):
    from reasoning.sft import SFTConfig, train_sft
    from helpers_models import tiny_model
    from reasoning.tokenizer import Tokenizer
    from tasks.synthetic import SyntheticReasoning

    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_dir)
    task = SyntheticReasoning("train", size=8, seed=1)

    def run(**kw):
        config = SFTConfig(num_iterations=2, device_batch_size=2, total_batch_rows=2, max_seq_len=96, eval_every=-1, base_dir=str(tmp_path),
                           out_tag="ft", **kw)
        model = tiny_model(tokenizer.vocab_size, depth=1, n_embd=32, max_seq_len=128)
        return train_sft(config, model, tokenizer, {"dir": "src", "step": 0}, torch.device("cpu"),
                         tasks=(task, None, None))

    run()
    with pytest.raises(UserError, match=r"checkpoint tag ft .*--resume.*--overwrite.*--out-tag"):
        run()
    assert run(overwrite=True)["finished"]


# ----------------------------------------------------------------------------------------------- divergence

def test_an_overflowing_update_leaves_no_poisoned_checkpoint(tiny_corpus, tmp_path, capsys):
    """Issue 17.2: `--matrix-lr 3e38 --num-iterations 1` exited 0 with val_bpb=nan and a checkpoint of inf/NaN."""
    code, out, err = run_script(base_argv(tiny_corpus, tmp_path, "--matrix-lr", "3e38", "--num-iterations", "1"),
                                capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: step 0: the update made weights inf/NaN") and "no checkpoint" in err
    assert "RESULT" not in out
    ckpt_dir = ckpt.checkpoint_dir("base", "t", str(tmp_path))
    assert ckpt.find_last_step(ckpt_dir) == -1 and every_checkpoint_loads_and_is_finite(ckpt_dir) == []


def test_the_last_good_checkpoint_named_in_the_error_is_finite(tiny_corpus, tmp_path, monkeypatch):
    from reasoning.gpt import GPT

    real_setup = GPT.setup_optimizer

    def poisoning_optimizer(model, **kwargs):  # the 4th update (step 3) sends one weight to inf
        optimizer = real_setup(model, **kwargs)
        real_step, calls = optimizer.step, {"n": 0}

        def step():
            real_step()
            calls["n"] += 1
            if calls["n"] == 4:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("inf")
        optimizer.step = step
        return optimizer

    monkeypatch.setattr(GPT, "setup_optimizer", poisoning_optimizer)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the update made weights inf/NaN.*last good "
                                                 r"checkpoint: .* step 3"):
        train(tiny(tiny_corpus, tmp_path, num_iterations=8, save_every=1, keep_last=0))
    ckpt_dir = ckpt.checkpoint_dir("base", "t", str(tmp_path))
    assert every_checkpoint_loads_and_is_finite(ckpt_dir) == [1, 2, 3]


@pytest.mark.parametrize("flags, expected", [
    (["--matrix-lr", "3.5e38"], "--matrix-lr 3.5e+38: expected a learning rate below 3.403e+38"),
    (["--embedding-lr", "1e39"], "--embedding-lr 1e+39: expected a learning rate below 3.403e+38"),
])
def test_learning_rates_beyond_float32_are_refused_with_the_flags(tiny_corpus, tmp_path, capsys, flags, expected):
    code, out, err = run_script(base_argv(tiny_corpus, tmp_path, "--num-iterations", "1", *flags), capsys)
    assert code == 2 and err.strip() == f"error: {expected} (the largest float32)"
    assert not os.path.exists(tmp_path / "checkpoints")


def test_fine_tuning_rates_are_checked_after_lr_scale():
    from reasoning.sft import SFTConfig

    with pytest.raises(UserError, match=r"--matrix-lr 0.02 \(x --lr-scale 1e\+40 = 2e\+38\)|--embedding-lr 0.2 "
                                        r"\(x --lr-scale 1e\+40"):
        SFTConfig(lr_scale=1e40).validate()
    SFTConfig(lr_scale=1e30).validate()


# ----------------------------------------------------------------------------------------------- resume inputs

def test_a_torn_metrics_line_is_dropped_on_resume_with_one_notice(tiny_corpus, tmp_path, capsys):
    """Issue 17.4: a torn last line in the metrics JSONL made --resume fail with a 36-line JSONDecodeError."""
    train(tiny(tiny_corpus, tmp_path, num_iterations=4, stop_at_step=2))
    log_path = os.path.join(tmp_path, "logs", "base_t.jsonl")
    with open(log_path, "a") as f:
        f.write('{"step": 3, "loss": 2.5, "smoo')  # the disk filled mid-write
    capsys.readouterr()
    resumed = train(tiny(tiny_corpus, tmp_path, num_iterations=4, resume=True))
    out = capsys.readouterr().out
    assert resumed["finished"] and out.count("dropped 1 line(s)") == 1 and log_path in out
    with open(log_path) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("key, value, expected", [
    ("loader_states", {"0": 1}, "'loader_states' is dict"),
    ("history", [], "'history' is list"),
    ("ema_loss", "low", "'ema_loss' is str"),
    ("rng", [{"python": 1}], "'rng' is malformed"),
    ("rng", [], "'rng' holds 0 states"),
])
def test_resume_from_hand_edited_meta_is_one_line(tiny_corpus, tmp_path, key, value, expected):
    train(tiny(tiny_corpus, tmp_path, num_iterations=4, stop_at_step=2))
    meta_path = os.path.join(ckpt.checkpoint_dir("base", "t", str(tmp_path)), "meta_000002.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta[key] = value
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(UserError) as info:
        train(tiny(tiny_corpus, tmp_path, num_iterations=4, resume=True))
    assert meta_path in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)


def test_resume_verifies_checksums(tiny_corpus, tmp_path, monkeypatch):
    """Issue 17.8: --resume used corrupted weights silently."""
    train(tiny(tiny_corpus, tmp_path, num_iterations=4, stop_at_step=2))
    optim_path = os.path.join(ckpt.checkpoint_dir("base", "t", str(tmp_path)), "optim_000002_rank0.pt")
    with open(optim_path, "r+b") as f:
        f.seek(os.path.getsize(optim_path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(UserError, match=f"checkpoint file {optim_path} is corrupt: its sha256"):
        train(tiny(tiny_corpus, tmp_path, num_iterations=4, resume=True))
