"""Byte identity of a refactor (issue 15): run tiny pretrain -> SFT -> RL through their CLIs (default flags apart
from tiny sizes, fixed seeds) in the source TREE given, and hash every checkpoint .pt file.

    python dev/check_identical.py OLD_TREE --save /tmp/ref.json     # e.g. a git worktree of the commit before
    python dev/check_identical.py .        --compare /tmp/ref.json  # exit 1 and the differing files if any

RL samples with the engine, so equal RL checkpoints also mean token-identical rollouts. The fixture (synthetic
corpus, 512-token tokenizer) is built once with the first tree's code and reused. Hashes depend on the CPU's float
kernels: compare trees on one machine."""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("tree")
ap.add_argument("--save")
ap.add_argument("--compare")
ap.add_argument("--fixture", default=os.path.join(tempfile.gettempdir(), "reasoning_ident_fixture"))
args = ap.parse_args()
tree = os.path.abspath(args.tree)
env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
py = os.path.join(tree, ".venv/bin/python")
if not os.path.exists(py):
    py = sys.executable

fx = args.fixture
if not os.path.exists(os.path.join(fx, "done")):
    os.makedirs(fx, exist_ok=True)
    code = ("from tasks.synthetic import write_synthetic_corpus\n"
            "from reasoning.dataset import iter_documents\n"
            "from reasoning.tokenizer import train_tokenizer\n"
            f"write_synthetic_corpus('{fx}/data', num_shards=3, docs_per_shard=400, seed=0)\n"
            f"train_tokenizer(iter_documents('{fx}/data', split='train'), 512).save('{fx}/tokenizer')\n")
    subprocess.run([py, "-c", code], cwd=tree, env=env, check=True)
    open(os.path.join(fx, "done"), "w").close()

base = tempfile.mkdtemp(prefix="ident_")
env["REASONING_BASE_DIR"] = base
common = ["--device", "cpu"]
stages = [
    ("base", "scripts.base_train", ["--depth", "2", "--aspect-ratio", "32", "--max-seq-len", "64", "--device-batch-size", "4",
      "--total-batch-size", "256", "--num-iterations", "8", "--eval-every", "4", "--sample-every", "-1", "--save-every", "4",
      "--tag", "t", "--data-dir", f"{fx}/data", "--tokenizer-dir", f"{fx}/tokenizer"]),
    ("sft", "scripts.chat_sft", ["--tag", "t", "--num-iterations", "6", "--eval-every", "3", "--device-batch-size", "2",
      "--total-batch-rows", "4", "--max-seq-len", "64", "--task-size", "40", "--val-examples", "8", "--save-every", "3"]),
    ("rl", "scripts.chat_rl", ["--tag", "t", "--num-steps", "4", "--prompts-per-step", "2", "--num-samples", "3",
      "--max-new-tokens", "12", "--task-size", "40", "--eval-every", "-1", "--save-every", "2", "--device-batch-size", "4"]),
]
hashes = {}
for stage, module, argv in stages:
    r = subprocess.run([py, "-m", module] + argv + common, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-3000:])
        sys.exit(f"{module} failed (rc {r.returncode})")
    d = os.path.join(base, "checkpoints", stage, "t")
    for name in sorted(os.listdir(d)):
        if name.endswith(".pt"):
            hashes[f"{stage}/{name}"] = hashlib.sha256(open(os.path.join(d, name), "rb").read()).hexdigest()
shutil.rmtree(base, ignore_errors=True)
print(json.dumps(hashes, indent=1))
if args.save:
    json.dump(hashes, open(args.save, "w"), indent=1)
if args.compare:
    ref = json.load(open(args.compare))
    diff = sorted(k for k in set(ref) | set(hashes) if ref.get(k) != hashes.get(k))
    print(f"RESULT identical={not diff} files={len(hashes)} differing={len(diff)} {' '.join(diff)}")
    sys.exit(1 if diff else 0)
print(f"RESULT files={len(hashes)}")
