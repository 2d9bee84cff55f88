"""wandb logging (issue 17, item 11): a tiny base_train run with `--run NAME` under WANDB_MODE=offline finishes and
leaves an offline wandb run holding its name, config and the logged metrics. The real script, in a subprocess
(wandb starts a service process and hooks the interpreter; keep that out of the test process)."""

import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_base_train_with_run_name_writes_an_offline_wandb_run(tiny_corpus, tmp_path):
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_root"
    wandb_dir.mkdir()
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true",
               WANDB_DISABLE_GIT="true", PYTHONPATH=REPO)
    env.pop("WANDB_API_KEY", None)
    run_name = "tiny-offline-check"
    argv = ["--depth", "1", "--aspect-ratio", "32", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64",
            "--num-iterations", "3", "--eval-every", "-1", "--sample-every", "-1", "--save-every", "-1",
            "--data-dir", tiny_corpus.data_dir, "--tokenizer-dir", tiny_corpus.tokenizer_dir,
            "--base-dir", str(tmp_path / "base"), "--device", "cpu", "--run", run_name]
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *argv], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("RESULT ")
    runs = glob.glob(str(wandb_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(wandb_dir)
    records = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    assert len(records) == 1 and os.path.getsize(records[0]) > 0
    data = open(records[0], "rb").read()
    assert run_name.encode() in data  # the run's name
    assert b"matrix_lr" in data  # the config
    assert b"loss" in data  # a logged metric
    assert not os.path.exists(tmp_path / "wandb")  # WANDB_DIR was honoured, nothing landed in the cwd
