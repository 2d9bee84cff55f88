"""Issue 17: base_train, chat_sft and chat_rl, killed with SIGKILL at a few moments -- one of them inside a
checkpoint write (the REASONING_TEST_SLOW_SAVE hook pauses every checkpoint file write halfway) -- and resumed, end
bitwise-identical to a run that was never interrupted; every checkpoint left behind loads (checksums verified) and
is finite, no temp file of a killed save survives, and the metrics log holds each step once."""

import importlib
import json
import multiprocessing
import os
import random
import signal
import sys
import time
import traceback

import pytest
import torch

from helpers_models import save_tiny_checkpoint, train_small_tokenizer
from reasoning import checkpoint as ckpt
from reasoning.common import run_main

# the reference runs in this process and the killed runs in forked children of it: one intra-op thread for all
pytestmark = pytest.mark.usefixtures("one_thread")


def _child(module: str, argv: list[str], base_dir: str, out_path: str, pause: float) -> None:
    """A stage script's main in a forked child (no interpreter start-up: seconds per launch on a loaded box),
    printing into out_path; it exits like the script would."""
    os.environ.update(REASONING_BASE_DIR=base_dir, **{ckpt.SLOW_SAVE_ENV: str(pause)})
    sys.stdout = sys.stderr = open(out_path, "a", buffering=1)
    code = 0
    try:
        run_main(lambda: importlib.import_module(module).main(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)


class _Launched:
    """A forked stage run: poll() is None while it runs, else its exit code."""

    def __init__(self, module, argv, base_dir, out_path, pause):
        open(out_path, "w").close()  # exists before the child writes to it: the parent polls it
        self.process = multiprocessing.get_context("fork").Process(
            target=_child, args=(module, argv, base_dir, out_path, pause))
        self.process.start()

    def poll(self):
        return None if self.process.is_alive() else self.process.exitcode

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()

    def wait(self, timeout: float) -> int:
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
        return self.process.exitcode


def _launch(module: str, argv: list[str], base_dir: str, out_path: str, pause: float) -> _Launched:
    return _Launched(module, argv, base_dir, out_path, pause)


def _wait(proc: _Launched, ready, timeout: float = 120.0) -> bool:
    """Poll until ready() (True) or the process ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the child neither got there nor ended")


def _temp_files(ckpt_dir: str) -> list[str]:
    return [n for n in os.listdir(ckpt_dir) if n.endswith(".tmp")] if os.path.isdir(ckpt_dir) else []


def _trained_steps(out_path: str) -> int:
    with open(out_path, errors="replace") as f:
        return sum(line.startswith("step ") and "/" in line.split()[1] for line in f)


def kill_and_resume(module, argv, base_dir, ckpt_dir, tmp_path, seed, random_kills, resume_needs_checkpoint):
    """Run `module` to the end through SIGKILLs: first inside the write of the 3rd checkpoint, then after
    `random_kills` random delays once training has started; each relaunch resumes. Returns the kill moments."""
    rng = random.Random(seed)
    moments = []
    for attempt in range(2 + random_kills):
        has_checkpoint = ckpt.find_last_step(ckpt_dir) >= 0
        resume = ["--resume"] if has_checkpoint or not resume_needs_checkpoint else []
        out_path = str(tmp_path / f"attempt{attempt}.out")
        if attempt == 0:  # every file write pauses 0.3 s halfway; the kill lands inside step 3's first file
            proc = _launch(module, argv + resume, base_dir, out_path, pause=0.3)
            assert _wait(proc, lambda: any("_000003" in n for n in _temp_files(ckpt_dir))), open(out_path).read()
            moments.append("inside the write of " + _temp_files(ckpt_dir)[0])
        elif attempt <= random_kills:  # a random moment once this slice trains (saves pause a little)
            proc = _launch(module, argv + resume, base_dir, out_path, pause=0.02)
            if _wait(proc, lambda: _trained_steps(out_path) > 0):
                delay = rng.uniform(0.0, 1.0)
                time.sleep(delay)
                moments.append(f"{delay:.2f} s after its first step")
            else:  # it ended before training (a resume of a finished run): it must have ended well
                assert proc.poll() == 0, open(out_path).read()[-3000:]
        else:  # the last slice runs to the end
            proc = _launch(module, argv + resume, base_dir, out_path, pause=0.0)
            assert proc.wait(timeout=300) == 0, open(out_path).read()[-3000:]
            return moments
        proc.kill()  # SIGKILL: no cleanup, no atexit, no finally
    return moments


def check_left_behind(ckpt_dir: str, reference_dir: str, log_path: str, reference_log: str, metric: str):
    """Bitwise-equal final weights, every checkpoint loads and is finite, no temp files, one log record per step."""
    final, _, meta = ckpt.load_checkpoint(ckpt_dir)
    expected, _, expected_meta = ckpt.load_checkpoint(reference_dir)
    assert meta["step"] == expected_meta["step"]
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert _temp_files(ckpt_dir) == []
    for step in ckpt.checkpoint_runs(ckpt_dir)[meta["run_id"]]:
        state, optim, _ = ckpt.load_checkpoint(ckpt_dir, step, load_optimizer=True)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert len(ckpt.checkpoint_runs(ckpt_dir)) == 1  # one run, whatever the kills

    def records(path):
        with open(path) as f:
            return [(r["step"], r[metric]) for r in map(json.loads, f) if metric in r]
    assert records(log_path) == records(reference_log)


def _reference(main, argv, base_dir, monkeypatch, capsys):
    monkeypatch.setenv("REASONING_BASE_DIR", base_dir)
    run_main(lambda: main(argv))
    capsys.readouterr()


def test_base_train_survives_sigkill(tiny_corpus, tmp_path, monkeypatch, capsys):
    from scripts.base_train import main

    argv = ["--depth", "1", "--aspect-ratio", "32", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64",
            "--num-iterations", "12", "--warmup-ratio", "0.2", "--eval-every", "-1", "--sample-every", "-1",
            "--save-every", "1", "--tag", "k", "--data-dir", tiny_corpus.data_dir,
            "--tokenizer-dir", tiny_corpus.tokenizer_dir, "--device", "cpu"]
    reference = str(tmp_path / "reference")
    _reference(main, argv, reference, monkeypatch, capsys)
    killed = str(tmp_path / "killed")
    ckpt_dir = ckpt.checkpoint_dir("base", "k", killed)
    moments = kill_and_resume("scripts.base_train", argv, killed, ckpt_dir, tmp_path, seed=1, random_kills=2,
                              resume_needs_checkpoint=True)
    print("killed:", moments)
    check_left_behind(ckpt_dir, ckpt.checkpoint_dir("base", "k", reference),
                      os.path.join(killed, "logs", "base_k.jsonl"), os.path.join(reference, "logs", "base_k.jsonl"),
                      "loss")


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("kill_tok") / "tokenizer")
    train_small_tokenizer(directory)
    return directory


def test_chat_sft_survives_sigkill(tiny_tokenizer_dir, tmp_path, monkeypatch, capsys):
    from scripts.chat_sft import main

    argv = ["--num-iterations", "10", "--eval-every", "-1", "--device-batch-size", "2", "--total-batch-rows", "2", "--max-seq-len", "96",
            "--task-size", "40", "--val-examples", "0", "--save-every", "1", "--warmup-ratio", "0.2",
            "--device", "cpu"]
    runs = {}
    for name in ("reference", "killed"):
        runs[name] = str(tmp_path / name)
        save_tiny_checkpoint(runs[name], tiny_tokenizer_dir, stage="base", tag="tiny", depth=1, max_seq_len=128)
    _reference(main, argv, runs["reference"], monkeypatch, capsys)
    ckpt_dir = ckpt.checkpoint_dir("sft", "tiny", runs["killed"])
    moments = kill_and_resume("scripts.chat_sft", argv, runs["killed"], ckpt_dir, tmp_path, seed=2, random_kills=1,
                              resume_needs_checkpoint=False)
    print("killed:", moments)
    check_left_behind(ckpt_dir, ckpt.checkpoint_dir("sft", "tiny", runs["reference"]),
                      os.path.join(runs["killed"], "logs", "sft_tiny.jsonl"),
                      os.path.join(runs["reference"], "logs", "sft_tiny.jsonl"), "loss")


def test_chat_rl_survives_sigkill(tiny_tokenizer_dir, tmp_path, monkeypatch, capsys):
    from scripts.chat_rl import main

    argv = ["--num-steps", "6", "--prompts-per-step", "2", "--num-samples", "2", "--max-new-tokens", "8",
            "--task-size", "40", "--eval-every", "-1", "--save-every", "1", "--device-batch-size", "4",
            "--lr-scale", "0.5", "--device", "cpu"]
    runs = {}
    for name in ("reference", "killed"):
        runs[name] = str(tmp_path / name)
        save_tiny_checkpoint(runs[name], tiny_tokenizer_dir, stage="sft", tag="tiny", depth=1, max_seq_len=128)
    _reference(main, argv, runs["reference"], monkeypatch, capsys)
    ckpt_dir = ckpt.checkpoint_dir("rl", "tiny", runs["killed"])
    moments = kill_and_resume("scripts.chat_rl", argv, runs["killed"], ckpt_dir, tmp_path, seed=3, random_kills=1,
                              resume_needs_checkpoint=False)
    print("killed:", moments)
    check_left_behind(ckpt_dir, ckpt.checkpoint_dir("rl", "tiny", runs["reference"]),
                      os.path.join(runs["killed"], "logs", "chat_rl_tiny.jsonl"),
                      os.path.join(runs["reference"], "logs", "chat_rl_tiny.jsonl"), "reward")
