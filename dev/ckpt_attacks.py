"""The checkpoint / training half of issue 17's fault matrix, run against a source tree: each attack runs the real
stage script (base_train, tiny settings) in a subprocess and is classified from what a user gets.

    python dev/ckpt_attacks.py                    # this tree
    python dev/ckpt_attacks.py --repo /work/main  # another checkout (the "before" column)

Outcomes: `clean` (exit != 0 with a one-line `error:`), `ok` (the run did what it should), `traceback`,
`lost` (a run's own checkpoints deleted), `poisoned` (a non-finite checkpoint left, or corrupted weights used
silently), `leftover` (a temp file of a killed save never pruned). Faults the OS cannot be asked for as root (disk
full, a kill inside a write) are injected by wrapping torch.save in the child. Last line:
`RESULT attacks=<n> clean_errors=<n> tracebacks=<n> lost_checkpoints=<n> poisoned_checkpoints=<n> leftovers=<n>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# wraps torch.save in the child: FAULT=enospc fails writes after 4 KB with ENOSPC; FAULT=kill SIGKILLs the process
# halfway through the model file of step FAULT_STEP (a kill inside a checkpoint write)
INJECT = r"""
import errno, os, runpy, signal, sys, torch
real_save = torch.save
class Faulty:
    def __init__(self, f): self.f, self.n, self.name = f, 0, getattr(f, "name", None) or getattr(f.file, "name", "")
    def write(self, b):
        self.n += len(b)
        if os.environ["FAULT"] == "enospc" and self.n > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        out = self.f.write(b)
        target = "model_%06d" % int(os.environ.get("FAULT_STEP", "0"))
        if os.environ["FAULT"] == "kill" and self.n > 4096 and target in self.name:
            self.f.flush(); os.kill(os.getpid(), signal.SIGKILL)
        return out
    def flush(self): self.f.flush()
def save(obj, f, *a, **k):
    return real_save(obj, Faulty(f) if hasattr(f, "write") else f, *a, **k)
torch.save = save
sys.argv = ["base_train"] + sys.argv[1:]
runpy.run_module("scripts.base_train", run_name="__main__")
"""


def run(repo, base, *flags, env=None, inject=False):
    """(exit code, stdout, stderr) of base_train from `repo` with tiny settings."""
    argv = ["--depth", "1", "--aspect-ratio", "32", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64",
            "--eval-every", "-1", "--sample-every", "-1", "--tag", "t", "--device", "cpu",
            "--data-dir", DATA, "--tokenizer-dir", TOKENIZER, "--base-dir", base, *flags]
    cmd = [sys.executable, "-c", INJECT] if inject else [sys.executable, "-m", "scripts.base_train"]
    proc = subprocess.run(cmd + argv, cwd=repo, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
                                   **(env or {})))
    return proc.returncode, proc.stdout, proc.stderr


def shape(code, err) -> str:
    if "Traceback" in err:
        return f"traceback (exit {code}): {err.strip().splitlines()[-1][:90]}"
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    if code != 0 and len(lines) == 1:
        return f"clean (exit {code}): {lines[0][:110]}"
    return f"exit {code}"


def ckpt_dir(base):
    return os.path.join(base, "checkpoints", "base", "t")


def steps(base):
    d = ckpt_dir(base)
    return sorted(int(n[5:11]) for n in os.listdir(d) if n.startswith("meta_")) if os.path.isdir(d) else []


def non_finite_checkpoints(base) -> int:
    import torch

    bad = 0
    for step in steps(base):
        state = torch.load(os.path.join(ckpt_dir(base), f"model_{step:06d}.pt"), weights_only=True)
        bad += any(not torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    return bad


def temp_files(base):
    return [n for n in os.listdir(ckpt_dir(base)) if n.endswith(".tmp")] if os.path.isdir(ckpt_dir(base)) else []


# ----------------------------------------------------------------------------------------------- the attacks

def attack_fresh_run_into_occupied_tag(repo, base):
    run(repo, base, "--num-iterations", "6", "--save-every", "2")      # another run: steps 4, 6 kept
    code, out, err = run(repo, base, "--num-iterations", "3", "--save-every", "1")
    own_kept = 3 in steps(base) and 2 in steps(base)
    lost = code == 0 and not own_kept
    return ("lost" if lost else "clean" if shape(code, err).startswith("clean") else "other",
            f"{shape(code, err)}; tag now holds steps {steps(base)}")


def attack_overflowing_lr(repo, base):
    code, out, err = run(repo, base, "--matrix-lr", "3e38", "--num-iterations", "1")
    bad = non_finite_checkpoints(base)
    last = out.strip().splitlines()[-1][:60] if out.strip() else "-"
    return ("poisoned" if bad else "clean" if shape(code, err).startswith("clean") else "other",
            f"{shape(code, err)}; {bad} non-finite checkpoint(s); last line: {last}")


def attack_lr_beyond_float32(repo, base):
    code, out, err = run(repo, base, "--matrix-lr", "3.5e38", "--num-iterations", "1")
    bad = non_finite_checkpoints(base)
    kind = "poisoned" if bad else "traceback" if "Traceback" in err else \
        "clean" if shape(code, err).startswith("clean") else "other"
    return kind, f"{shape(code, err)}; {bad} non-finite checkpoint(s)"


def attack_torn_metrics_line(repo, base):
    run(repo, base, "--num-iterations", "4", "--stop-at-step", "2")
    with open(os.path.join(base, "logs", "base_t.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 2.5, "smoo')
    code, out, err = run(repo, base, "--num-iterations", "4", "--resume")
    return ("ok" if code == 0 else "traceback" if "Traceback" in err else "clean",
            f"{shape(code, err)}; {'notice printed' if 'dropped' in out else 'no notice'}")


def attack_hand_edited_meta(repo, base):
    run(repo, base, "--num-iterations", "4", "--stop-at-step", "2")
    path = os.path.join(ckpt_dir(base), "meta_000002.json")
    with open(path) as f:
        meta = json.load(f)
    meta["step"] = "2"
    with open(path, "w") as f:
        json.dump(meta, f)
    code, out, err = run(repo, base, "--num-iterations", "4", "--resume")
    return "traceback" if "Traceback" in err else "clean" if shape(code, err).startswith("clean") else "other", \
        shape(code, err)


def attack_read_only_base_dir(repo, base):
    code, out, err = run(repo, "/sys/kernel/reasoning", "--num-iterations", "1")  # a read-only file system
    return "traceback" if "Traceback" in err else "clean" if shape(code, err).startswith("clean") else "other", \
        shape(code, err)


def attack_base_dir_under_a_file(repo, base):
    os.makedirs(base, exist_ok=True)
    blocker = os.path.join(base, "file")
    open(blocker, "w").close()
    code, out, err = run(repo, os.path.join(blocker, "base"), "--num-iterations", "1")
    return "traceback" if "Traceback" in err else "clean" if shape(code, err).startswith("clean") else "other", \
        shape(code, err)


def attack_disk_full_during_save(repo, base):
    code, out, err = run(repo, base, "--num-iterations", "2", env={"FAULT": "enospc"}, inject=True)
    last = err.strip().splitlines()[-1].lower() if err.strip() else ""
    says = "says 'no space left'" if "no space left" in last else "its last line never says 'no space left'"
    kind = "traceback" if "Traceback" in err else "clean" if shape(code, err).startswith("clean") else "other"
    return kind, f"{shape(code, err)}; {says}; temp files {len(temp_files(base))}"


def attack_kill_inside_a_save(repo, base):
    run(repo, base, "--num-iterations", "4", "--save-every", "1", env={"FAULT": "kill", "FAULT_STEP": "3"},
        inject=True)
    left_after_kill = len(temp_files(base))
    code, out, err = run(repo, base, "--num-iterations", "4", "--save-every", "1", "--resume")
    left = temp_files(base)
    return ("leftover" if left else "ok" if code == 0 else "other",
            f"killed: {left_after_kill} temp file(s); after the resumed run finished (exit {code}): {len(left)}")


def attack_corrupted_model_file(repo, base):
    import random

    run(repo, base, "--num-iterations", "4", "--stop-at-step", "2")
    path = os.path.join(ckpt_dir(base), "model_000002.pt")
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        rng = random.Random(0)
        for i in rng.sample(range(2 * len(data) // 5, 3 * len(data) // 5), 100):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)
    code, out, err = run(repo, base, "--num-iterations", "4", "--resume")
    kind = "poisoned" if code == 0 else "traceback" if "Traceback" in err else "clean"
    return kind, f"{shape(code, err)}" + ("; resumed from the corrupted weights" if code == 0 else "")


ATTACKS = [attack_fresh_run_into_occupied_tag, attack_overflowing_lr, attack_lr_beyond_float32,
           attack_torn_metrics_line, attack_hand_edited_meta, attack_read_only_base_dir, attack_base_dir_under_a_file,
           attack_disk_full_during_save, attack_kill_inside_a_save, attack_corrupted_model_file]


def main():
    global DATA, TOKENIZER
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=HERE, help="source tree whose scripts are attacked (default: this one)")
    parser.add_argument("--only", default=None, help="run the attacks whose name contains this")
    args = parser.parse_args()
    repo = os.path.abspath(args.repo)
    root = tempfile.mkdtemp(prefix="ckpt_attacks_")
    try:
        sys.path.insert(0, HERE)  # the corpus and tokenizer come from this tree (same formats in both)
        from reasoning.dataset import iter_documents
        from reasoning.tokenizer import train_tokenizer
        from tasks.synthetic import write_synthetic_corpus

        DATA, TOKENIZER = os.path.join(root, "data"), os.path.join(root, "tokenizer")
        write_synthetic_corpus(DATA, num_shards=2, docs_per_shard=200, seed=0)
        train_tokenizer(iter_documents(DATA, split="train"), 512).save(TOKENIZER)
        counts = {}
        print(f"attacks on {repo}")
        for attack in ATTACKS:
            if args.only and args.only not in attack.__name__:
                continue
            kind, detail = attack(repo, os.path.join(root, attack.__name__))
            counts[kind] = counts.get(kind, 0) + 1
            print(f"  {attack.__name__[len('attack_'):]:34s} {kind:9s} {detail}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"RESULT attacks={sum(counts.values())} clean_errors={counts.get('clean', 0)} ok={counts.get('ok', 0)} "
          f"tracebacks={counts.get('traceback', 0)} lost_checkpoints={counts.get('lost', 0)} "
          f"poisoned_checkpoints={counts.get('poisoned', 0)} leftovers={counts.get('leftover', 0)} "
          f"other={counts.get('other', 0)}")


if __name__ == "__main__":
    main()
