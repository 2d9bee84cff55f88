"""The GPU fast path as far as a CPU can check it: compile defaults per device, TF32, the prefetching loader
(identical batches), and a compiled SFT step equal to the eager one."""

import threading
from unittest import mock

import pytest
import torch

from reasoning.common import enable_tf32
from reasoning.dataloader import Prefetcher, build_train_loader
from reasoning.pretrain import TrainConfig
from reasoning.sft import SFTConfig
from reasoning.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compile_is_on_by_default_on_cuda_only():
    for cls in (TrainConfig, SFTConfig):
        config = cls()
        assert config.compile is None
        assert config.compile_on("cuda") and not config.compile_on("cpu")
        assert config.optimizer_compile_backend("cuda") == "inductor"
        assert config.optimizer_compile_backend("cpu") is None
        off = cls(compile=False)
        assert not off.compile_on("cuda") and off.optimizer_compile_backend("cuda") is None
        assert cls(compile=True).compile_on("cpu")  # asked for: compiled on CPU too (the model; the optimizer
        assert cls(compile=True).optimizer_compile_backend("cpu") is None  # kernels only pay off on CUDA)


def test_compile_flag_has_three_states():
    import argparse

    from reasoning.rl import RLConfig

    for cls in (TrainConfig, SFTConfig, RLConfig):
        parser = argparse.ArgumentParser()
        cls.add_args(parser)
        assert parser.parse_args([]).compile is None
        assert parser.parse_args(["--compile"]).compile is True
        assert parser.parse_args(["--no-compile"]).compile is False


def test_tf32_is_enabled_for_cuda_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        enable_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        enable_tf32(torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_prefetcher_yields_the_loaders_batches_and_counts(tiny_corpus):
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_dir)
    plain = build_train_loader(tokenizer, 2, 32, tiny_corpus.data_dir)
    ahead = Prefetcher(build_train_loader(tokenizer, 2, 32, tiny_corpus.data_dir), depth=2)
    try:
        for _ in range(12):
            x, y, state = next(plain)
            px, py, pstate = next(ahead)
            assert torch.equal(x, px) and torch.equal(y, py) and state == pstate
            # counters as of the batch handed out, not of the ones read ahead
            assert ahead.counts == plain.counts
    finally:
        ahead.close()
    assert not ahead._thread.is_alive()


def test_prefetcher_raises_the_loaders_error_and_stops_at_the_end():
    class Failing:
        counts = {}

        def __iter__(self):
            yield torch.zeros(1), torch.zeros(1), {"counts": {"n": 1}}
            raise ValueError("shard 3 is corrupt")

    failing = Prefetcher(Failing())
    next(failing)
    with pytest.raises(ValueError, match="shard 3 is corrupt"):
        next(failing)
    failing.close()

    class Finite:
        counts = {}

        def __iter__(self):
            return iter([(1, 2, {"counts": {}})])

    finite = Prefetcher(Finite())
    assert next(finite)[0] == 1
    for _ in range(2):  # stays stopped
        with pytest.raises(StopIteration):
            next(finite)
    finite.close()
    assert threading.active_count() < 50  # closed threads do not pile up


@pytest.mark.slow
def test_compiled_sft_matches_eager(tmp_path):
    from helpers_models import tiny_model, train_small_tokenizer
    from reasoning.sft import train_sft
    from tasks.synthetic import SyntheticReasoning

    tokenizer = train_small_tokenizer(str(tmp_path / "tok"))
    train = SyntheticReasoning("train", size=8, seed=3, num_steps=(1, 2))
    curves = {}
    for compile_flag in (False, True):
        model = tiny_model(tokenizer.vocab_size, depth=1, n_embd=32, max_seq_len=128, noise=0.1)
        config = SFTConfig(num_iterations=3, device_batch_size=2, total_batch_rows=4, max_seq_len=96, eval_every=-1,
                           log_every=1000, base_dir=str(tmp_path / str(compile_flag)), out_tag="t",
                           compile=compile_flag, compile_backend="aot_eager")
        with mock.patch("torch.compile", wraps=torch.compile) as spy:
            out = train_sft(config, model, tokenizer, {"dir": "test", "step": 0}, torch.device("cpu"),
                            tasks=(train, None, None))
        assert spy.called == compile_flag
        curves[compile_flag] = [loss for _, loss in out["losses"]]
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
