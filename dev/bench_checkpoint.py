"""What the checkpoint checksums cost: save (sha256 while writing) and load (size + sha256 before torch.load) of a
realistic file, against torch.save / torch.load alone, side by side in one run (medians of --rounds).

    python dev/bench_checkpoint.py --mb 500 --rounds 3

Loads read from the page cache (the file was just written), the worst case for the relative cost of hashing; from
a cold disk the read itself dominates. The last line is `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reasoning import checkpoint as ckpt  # noqa: E402
from reasoning.common import atomic_write  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500, help="model file size in MB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    directory = tempfile.mkdtemp(dir=args.dir, prefix="bench_ckpt_")
    state = {f"w{i}": torch.randn(args.mb * 2**20 // 4 // 8) for i in range(8)}  # 8 tensors, args.mb MB in all
    plain_path = os.path.join(directory, "plain.pt")
    ckpt_dir = os.path.join(directory, "ckpt")
    rows = {"save_plain": [], "save_checksummed": [], "load_plain": [], "load_verified": [], "sha256_only": []}
    try:
        for _ in range(args.rounds):
            rows["save_plain"].append(timed(lambda: atomic_write(plain_path, lambda f: torch.save(state, f))))
            rows["save_checksummed"].append(timed(lambda: ckpt.save_checkpoint(ckpt_dir, 1, state, run_id="bench")))
            rows["load_plain"].append(timed(lambda: torch.load(plain_path, weights_only=True)))
            os.environ[ckpt.VERIFY_ENV] = "1"
            rows["load_verified"].append(timed(lambda: ckpt.load_checkpoint(ckpt_dir, 1)))

            def hash_file():
                digest = hashlib.sha256()
                with open(os.path.join(ckpt_dir, "model_000001.pt"), "rb") as f:
                    while chunk := f.read(8 << 20):
                        digest.update(chunk)
            rows["sha256_only"].append(timed(hash_file))
        size_mb = os.path.getsize(os.path.join(ckpt_dir, "model_000001.pt")) / 2**20
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"file {size_mb:.0f} MB, {args.rounds} rounds, medians (s):")
    for key, value in med.items():
        every = " ".join(f"{t:.3f}" for t in rows[key])
        print(f"  {key:18s} {value:7.3f}   ({size_mb / value:7.0f} MB/s)   all: {every}")
    save_ratio = med["save_checksummed"] / med["save_plain"]
    load_ratio = med["load_verified"] / med["load_plain"]
    print(f"RESULT file_mb={size_mb:.0f} sha256_mb_s={size_mb / med['sha256_only']:.0f} "
          f"save_ratio={save_ratio:.2f} load_ratio={load_ratio:.2f} "
          f"verify_s={med['load_verified'] - med['load_plain']:.2f}")


if __name__ == "__main__":
    main()
