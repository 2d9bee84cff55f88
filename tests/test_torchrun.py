"""Real multi-process runs of scripts.base_train under `torchrun --nproc_per_node=2` (gloo on CPU).

Checks that data-parallel training is the same computation as one process accumulating the same global batch
(same data via simulate_ranks=2), and that a 2-rank run resumes bitwise (per-rank loader positions, sharded
optimizer state). Sizes are micro: each launch costs seconds of interpreter and process-group startup.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from reasoning import checkpoint as ckpt
from reasoning.pretrain import TrainConfig
from scripts.base_train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# 2 ranks × 2 rows × 32 tokens × 2 accumulation steps; clipping, warmup/warmdown and momentum ramp all active
TRAIN = dict(depth=1, aspect_ratio=32, max_seq_len=32, device_batch_size=2, total_batch_size=256,
             num_iterations=STEPS, grad_clip=0.3, warmup_ratio=0.25, warmdown_ratio=0.5, muon_momentum_warmup=3,
             eval_every=-1, sample_every=-1, tag="ddp")


def base_train_args(corpus, base_dir, *extra: str) -> list[str]:
    flags = []
    for key, value in TRAIN.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return ["-m", "scripts.base_train", "--", *flags, "--data-dir", corpus.data_dir, "--tokenizer-dir",
            corpus.tokenizer_dir, "--base-dir", str(base_dir), "--device", "cpu", "--shard-optimizer", *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def torchrun(corpus, base_dir, *extra: str, timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *base_train_args(corpus, base_dir, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_losses(base_dir) -> list[tuple[int, float]]:
    with open(os.path.join(base_dir, "logs", "base_ddp.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def two_rank_run(tiny_corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp_straight")
    torchrun(tiny_corpus, base)
    return base


def test_two_ranks_match_one_process_with_the_same_global_batch(two_rank_run, tiny_corpus, tmp_path):
    ddp = logged_losses(two_rank_run)
    single = train(TrainConfig(**TRAIN, simulate_ranks=2, data_dir=tiny_corpus.data_dir,
                               tokenizer_dir=tiny_corpus.tokenizer_dir, base_dir=str(tmp_path), device="cpu"))
    assert [s for s, _ in ddp] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(ddp, single["losses"]):
        assert abs(a - b) < 1e-4, (step, a, b)
    # the comparison has teeth: one data rank alone (half the batch, other rows) gives another curve
    alone = train(TrainConfig(**dict(TRAIN, total_batch_size=128), data_dir=tiny_corpus.data_dir,
                              tokenizer_dir=tiny_corpus.tokenizer_dir, base_dir=str(tmp_path / "alone"), device="cpu"))
    assert max(abs(a - b) for (_, a), (_, b) in zip(ddp, alone["losses"])) > 1e-3


def test_two_rank_resume_is_bitwise(two_rank_run, tiny_corpus, tmp_path):
    torchrun(tiny_corpus, tmp_path, "--stop-at-step", "2")
    ckpt_dir = ckpt.checkpoint_dir("base", "ddp", str(tmp_path))
    assert ckpt.find_last_step(ckpt_dir) == 2
    assert sorted(f for f in os.listdir(ckpt_dir) if f.startswith("optim_")) == [
        "optim_000002_rank0.pt", "optim_000002_rank1.pt"]  # sharded optimizer: one state file per rank
    torchrun(tiny_corpus, tmp_path, "--resume")
    assert logged_losses(tmp_path) == logged_losses(two_rank_run)  # bitwise: exact float equality
    resumed, _, _ = ckpt.load_checkpoint(ckpt_dir)
    straight, _, _ = ckpt.load_checkpoint(ckpt.checkpoint_dir("base", "ddp", str(two_rank_run)))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    with open(os.path.join(tmp_path, "report", "base_train.json")) as f:  # rank 0 reported the finished run
        section = json.load(f)
    assert section["metrics"]["params"] > 0 and len(section["series"]["train_loss"]) == STEPS


def test_two_nodes_match_one_node_with_the_same_world_size(two_rank_run, tiny_corpus, tmp_path):
    """`torchrun --nnodes 2`: two launchers ("nodes", one process each) meet at a c10d rendezvous on 127.0.0.1,
    as two machines would on the first one's address. Same world size, same data layout: the same losses, bit for
    bit, as the single-node 2-process run; global rank 0 alone wrote the checkpoint and report (shared base dir)."""
    port = free_port()
    launchers = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "two-nodes", *base_train_args(tiny_corpus, tmp_path)]
        launchers.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = []
    try:
        for proc in launchers:
            out, _ = proc.communicate(timeout=300)
            outputs.append(out)
    finally:
        for proc in launchers:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(launchers, outputs):
        assert proc.returncode == 0, f"node failed ({proc.returncode}):\n{out[-3000:]}"
    assert logged_losses(tmp_path) == logged_losses(two_rank_run)
    ckpt_dir = ckpt.checkpoint_dir("base", "ddp", str(tmp_path))
    assert ckpt.find_last_step(ckpt_dir) == STEPS
    assert os.path.exists(os.path.join(tmp_path, "report", "base_train.json"))
