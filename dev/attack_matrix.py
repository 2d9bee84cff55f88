"""The fault and bad-input matrix of issue 17 ("nothing lost, nothing poisoned"), run against the real scripts and the
real server at tiny sizes, each attack in its own subprocess.

    python -m dev.attack_matrix                 # the whole matrix (~3-5 min on a loaded 2-core CPU box)
    python -m dev.attack_matrix --only api,grader --keep /tmp/am   # a subset (substring of the attack names)
    python -m dev.attack_matrix --repo /tmp/old_checkout          # attack another checkout's scripts (before/after)

Every attack has an expected outcome and gets one of:
  ok                    the run succeeded and did the right thing
  clean_error           it stopped with a one-line `error: ...` (exit code != 0, no traceback)
  traceback             a Python traceback (or a crash without an `error:` line)
  lost_checkpoint       a checkpoint that existed before the attack was deleted or overwritten, or a run that
                        exited 0 left no checkpoint of its own last step
  poisoned_checkpoint   a checkpoint left behind holds non-finite weights, or damaged weights were used silently
  wrong                 no crash, but the wrong behaviour (bad input accepted, a leftover temp file, a reply that
                        differs from greedy, an error message that misses its point)
  hang                  no answer within the attack's time bound
  skipped               the attack cannot run here (e.g. no mount namespaces for the read-only / disk-full cases)

Faults are real where this machine allows it: a read-only bind mount and a small tmpfs (disk full) inside a private
mount namespace (`unshare -m`, needs root), SIGKILL inside a checkpoint write (a wrapper around torch.save), bytes
flipped in a model file on disk, a raw socket that sends half a request body. Prints a table, then
`RESULT attacks=<n> clean_errors=<n> tracebacks=<n> lost_checkpoints=<n> poisoned_checkpoints=<n> ...`.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HARNESS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout holding this script
REPO = HARNESS  # the checkout whose scripts are attacked (--repo: e.g. an older one, for a before/after table)
PY = sys.executable
TINY = ["--depth", "1", "--aspect-ratio", "32", "--max-seq-len", "32", "--device-batch-size", "2",
        "--total-batch-size", "64", "--eval-every", "-1", "--sample-every", "-1", "--device", "cpu"]
# A resumed run keeps every checkpoint, so that any earlier file gone afterwards is a loss, not keep_last pruning
KEEP_ALL = ("--keep-last", "0")
OUTCOMES = ("ok", "clean_error", "traceback", "lost_checkpoint", "poisoned_checkpoint", "wrong", "hang", "skipped")


@dataclass
class Outcome:
    item: str          # issue item number
    name: str
    expected: str
    got: str
    note: str = ""
    seconds: float = 0.0


@dataclass
class Proc:
    rc: int | None     # None: killed at the time bound
    out: str
    err: str
    seconds: float


# ----------------------------------------------------------------------------------------------- plumbing

def run(cmd: list[str], env: dict, timeout: float = 180, cwd: str | None = None) -> Proc:
    start = time.monotonic()
    try:
        p = subprocess.run(cmd, env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
        return Proc(p.returncode, p.stdout, p.stderr, time.monotonic() - start)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return Proc(None, out, err, time.monotonic() - start)


def script(name: str, *args: str) -> list[str]:
    return [PY, "-m", f"scripts.{name}", *args]


def classify(proc: Proc) -> tuple[str, str]:
    """(outcome, note) of a finished script: ok / clean_error / traceback / hang."""
    if proc.rc is None:
        return "hang", f"killed after {proc.seconds:.0f}s"
    lines = [line for line in proc.err.strip().splitlines() if line.strip()]
    if "Traceback (most recent call last)" in proc.err:
        last = lines[-1] if lines else ""
        return "traceback", last[:110]
    if proc.rc == 0:
        return "ok", ""
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return "clean_error", errors[-1][:110]
    return "traceback", f"exit {proc.rc} without an 'error:' line: {(lines[-1] if lines else '')[:80]}"


def ckpt_dir(base: str, stage: str, tag: str) -> str:
    return os.path.join(base, "checkpoints", stage, tag)


def snapshot(directory: str) -> dict[str, str]:
    """{file name: sha256} of the checkpoint files (model/optim/meta) in a directory."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*"))):
        name = os.path.basename(path)
        if re.match(r"(model|optim|meta)_\d+", name):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def meta_steps(directory: str) -> list[int]:
    return sorted(int(m.group(1)) for p in glob.glob(os.path.join(directory, "meta_*.json"))
                  if (m := re.match(r"meta_(\d+)\.json$", os.path.basename(p))))


def nonfinite_checkpoints(directory: str) -> list[str]:
    """Model files under `directory` that fail to load or hold a non-finite value."""
    import torch

    bad = []
    for path in sorted(glob.glob(os.path.join(directory, "model_*.pt"))):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            tensors = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
            if not all(torch.isfinite(t).all() for t in tensors):
                bad.append(os.path.basename(path))
        except Exception:
            bad.append(os.path.basename(path) + " (unloadable)")
    return bad


def checkpoint_verdict(before: dict[str, str], directory: str) -> str | None:
    """lost_checkpoint / poisoned_checkpoint, or None when every earlier checkpoint file is intact and all finite."""
    after = snapshot(directory)
    if any(after.get(name) != digest for name, digest in before.items()):
        return "lost_checkpoint"
    if nonfinite_checkpoints(directory):
        return "poisoned_checkpoint"
    return None


def can_unshare() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def in_mount_namespace(setup: str, cmd: list[str]) -> list[str]:
    """cmd run inside a private mount namespace after the shell `setup` (mounts visible to it alone)."""
    return ["unshare", "-m", "sh", "-c", setup + " && exec \"$@\"", "sh", *cmd]


# A crashed save, injected inside the real script: SIGKILL just before the Nth `os.replace` onto a model file, i.e.
# with the new checkpoint fully written to its temp file but not yet in place (every checkpoint write is temp file +
# os.replace, whatever produces the bytes). The wrapper then runs the script as `python -m` would.
_KILL_WRAPPER = r"""
import os, runpy, signal, sys
nth, module = int(sys.argv[1]), sys.argv[2]
_replace, count = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)).startswith("model_"):
        count[0] += 1
        if count[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def killed_at_model_write(nth: int, module: str, *args: str) -> list[str]:
    return [PY, "-c", _KILL_WRAPPER, str(nth), module, *args]


# ----------------------------------------------------------------------------------------------- the matrix

class Matrix:
    def __init__(self, root: str, only: list[str] | None):
        self.root, self.only = root, only
        self.base = os.path.join(root, "base")
        self.env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", REASONING_BASE_DIR=self.base,
                        WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        self.results: list[Outcome] = []
        self.data_dir = os.path.join(self.base, "base_data")
        self.tokenizer_dir = os.path.join(self.base, "tokenizer")

    def wanted(self, name: str) -> bool:
        return not self.only or any(word in name for word in self.only)

    def record(self, item: str, name: str, expected: str, got: str, note: str = "", seconds: float = 0.0):
        self.results.append(Outcome(item, name, expected, got, note, seconds))
        mark = "  " if got == expected or (expected == "ok|clean_error" and got in ("ok", "clean_error")) else "!!"
        print(f"{mark} [{item:>2}] {name[:58]:58s} expected {expected:15s} got {got:19s} {seconds:5.1f}s  {note[:90]}",
              flush=True)

    def attack(self, item: str, name: str, expected: str, fn):
        if not self.wanted(name):
            return
        start = time.monotonic()
        try:
            got, note = fn()
        except Exception as e:  # a bug of this harness, not of the project: show it, do not count it as a pass
            got, note = "wrong", f"harness error: {type(e).__name__}: {e}"[:110]
        self.record(item, name, expected, got, note, time.monotonic() - start)

    def base_train(self, tag: str, *args: str, env: dict | None = None, base: str | None = None,
                   timeout: float = 180) -> Proc:
        return run(script("base_train", *TINY, "--tag", tag, "--data-dir", self.data_dir, "--tokenizer-dir",
                          self.tokenizer_dir, "--base-dir", base or self.base, *args), env or self.env, timeout)

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self):
        steps = [
            [PY, "-m", "scripts.base_data", "--synthetic", "--num-shards", "2", "--docs-per-shard", "300"],
            script("tok_train", "--vocab-size", "512"),
        ]
        for cmd in steps:
            proc = run(cmd, self.env, 300)
            if proc.rc != 0:
                raise SystemExit(f"setup failed: {' '.join(cmd)}\n{proc.err[-2000:]}")
        proc = self.base_train("a", "--num-iterations", "4", "--save-every", "2")
        if proc.rc != 0:
            raise SystemExit(f"setup failed: base_train tag a\n{proc.err[-2000:]}")
        print(f"setup: corpus, tokenizer, base checkpoint a (steps {meta_steps(ckpt_dir(self.base, 'base', 'a'))})",
              flush=True)

    def copy_tag(self, src: str, dst: str) -> str:
        target = ckpt_dir(self.base, "base", dst)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ckpt_dir(self.base, "base", src), target)
        return target

    # -- item 1: a new run into a tag that holds another run's checkpoints ---------------------------------------

    def tag_reuse(self):
        directory = self.copy_tag("a", "reuse")
        before = snapshot(directory)
        proc = self.base_train("reuse", "--num-iterations", "2", "--save-every", "1")
        got, note = classify(proc)
        verdict = checkpoint_verdict(before, directory)
        if verdict:
            return verdict, f"exit {proc.rc}; files of the earlier run changed or gone; left: {meta_steps(directory)}"
        if proc.rc == 0 and 2 not in meta_steps(directory):
            return "lost_checkpoint", f"exit 0 but its own step 2 is gone; left: {meta_steps(directory)}"
        return got, note

    # -- item 2 / 5: learning rates that overflow -----------------------------------------------------------------

    def huge_lr(self, tag: str, lr: str):
        directory = ckpt_dir(self.base, "base", tag)
        shutil.rmtree(directory, ignore_errors=True)
        proc = self.base_train(tag, "--matrix-lr", lr, "--num-iterations", "2", "--save-every", "1")
        got, note = classify(proc)
        bad = nonfinite_checkpoints(directory)
        if bad:
            return "poisoned_checkpoint", f"exit {proc.rc}; non-finite: {', '.join(bad)}"
        return got, note

    # -- item 4: damaged metrics log on --resume ------------------------------------------------------------------

    def damaged_log(self, tag: str, damage: bytes):
        self.copy_tag("a", tag)
        src = glob.glob(os.path.join(self.base, "logs", "*_a.jsonl"))
        if not src:
            return "wrong", "setup run wrote no metrics log"
        log = src[0][:-len("_a.jsonl")] + f"_{tag}.jsonl"
        shutil.copyfile(src[0], log)
        with open(log, "ab") as f:
            f.write(damage)
        directory = ckpt_dir(self.base, "base", tag)
        before = snapshot(directory)
        proc = self.base_train(tag, "--num-iterations", "6", "--save-every", "2", "--resume", *KEEP_ALL)
        got, note = classify(proc)
        return checkpoint_verdict(before, directory) or got, note

    # -- item 5: bad inputs ---------------------------------------------------------------------------------------

    def customjson(self, content: bytes):
        path = os.path.join(self.root, f"custom_{hashlib.sha1(content[:64]).hexdigest()[:6]}.jsonl")
        with open(path, "wb") as f:
            f.write(content)
        proc = run(script("chat_sft", "--stage", "base", "--tag", "a", "--task", f"customjson:{path}",
                          "--num-iterations", "1", "--device", "cpu", "--out-tag", "custom"), self.env)
        return classify(proc)

    def read_only_base(self):
        if not can_unshare():
            return "skipped", "no mount namespace (unshare -m) here"
        base = os.path.join(self.root, "ro_base")
        os.makedirs(base, exist_ok=True)
        setup = f"mount --bind '{base}' '{base}' && mount -o remount,ro,bind '{base}' '{base}'"
        cmd = script("base_train", *TINY, "--tag", "ro", "--data-dir", self.data_dir, "--tokenizer-dir",
                     self.tokenizer_dir, "--base-dir", base, "--num-iterations", "2", "--save-every", "1")
        return classify(run(in_mount_namespace(setup, cmd), self.env))

    def base_under_file(self):
        blocker = os.path.join(self.root, "a_regular_file")
        with open(blocker, "w") as f:
            f.write("not a folder\n")
        proc = self.base_train("uf", "--num-iterations", "1", base=os.path.join(blocker, "base"))
        return classify(proc)

    def disk_full(self):
        if not can_unshare():
            return "skipped", "no mount namespace (unshare -m) here"
        a = ckpt_dir(self.base, "base", "a")
        one = sum(os.path.getsize(p) for p in glob.glob(os.path.join(a, f"*_{meta_steps(a)[-1]:06d}*")))
        base = os.path.join(self.root, "full_base")
        os.makedirs(base, exist_ok=True)
        size_kb = int(one * 1.5 / 1024) + 96  # the first checkpoint (+ logs) fits, the second does not
        setup = f"mount -t tmpfs -o size={size_kb}k tmpfs '{base}'"
        # the probe lists what is left from inside the namespace (the tmpfs vanishes with it)
        cmd = script("base_train", *TINY, "--tag", "full", "--data-dir", self.data_dir, "--tokenizer-dir",
                     self.tokenizer_dir, "--base-dir", base, "--num-iterations", "4", "--save-every", "1")
        listing = (f"; echo '---left---' >&2; ls {base}/checkpoints/base/full >&2; "
                   f"{PY} -c \"import sys; sys.path.insert(0, '{HARNESS}'); from dev.attack_matrix import "
                   f"nonfinite_checkpoints as n; print('NONFINITE', n('{base}/checkpoints/base/full'), "
                   "file=sys.stderr)\"")
        proc = run(["unshare", "-m", "sh", "-c", setup + " && \"$@\"; rc=$?" + listing + "; exit $rc", "sh", *cmd],
                   self.env)
        err, _, left = proc.err.partition("---left---")
        got, note = classify(Proc(proc.rc, proc.out, err, proc.seconds))
        if "NONFINITE []" not in left:
            return "poisoned_checkpoint", left.strip().replace("\n", " ")[:110]
        if not re.search(r"meta_\d+\.json", left) and proc.rc != 0:
            return "lost_checkpoint", "no complete checkpoint left after the disk filled"
        error_line = next((line for line in reversed(err.splitlines()) if line.startswith("error:")), "")
        if got == "clean_error" and "space" not in error_line.lower():  # the whole line, not the table's excerpt
            return "wrong", "one line, but it does not say the disk is full: " + note
        return got, note

    def garbage_tokenizer(self, file: str, content: bytes):
        base = os.path.join(self.root, f"tok_{file.replace('.', '_')}")
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(self.tokenizer_dir, os.path.join(base, "tokenizer"))
        with open(os.path.join(base, "tokenizer", file), "wb") as f:
            f.write(content)
        return classify(run(script("tok_eval"), dict(self.env, REASONING_BASE_DIR=base)))

    def bad_meta(self, edit, resume: bool = False):
        directory = self.copy_tag("a", "meta")
        path = os.path.join(directory, f"meta_{meta_steps(directory)[-1]:06d}.json")
        with open(path) as f:
            meta = json.load(f)
        edit(meta)
        with open(path, "w") as f:
            json.dump(meta, f)
        if resume:
            proc = self.base_train("meta", "--num-iterations", "6", "--save-every", "2", "--resume", *KEEP_ALL)
        else:
            proc = run(script("chat_cli", "--stage", "base", "--tag", "meta", "-p", "hi", "--max-tokens", "4",
                              "--temperature", "0", "--device", "cpu"), self.env)
        return classify(proc)

    # -- item 7: temp files of a crashed save ---------------------------------------------------------------------

    def crashed_save(self):
        directory = ckpt_dir(self.base, "base", "crash")
        shutil.rmtree(directory, ignore_errors=True)
        args = [*TINY, "--tag", "crash", "--data-dir", self.data_dir, "--tokenizer-dir", self.tokenizer_dir,
                "--save-every", "1"]
        killed = run(killed_at_model_write(2, "scripts.base_train", *args, "--num-iterations", "4"), self.env)
        if killed.rc != -9:
            return "wrong", f"the injected SIGKILL did not happen (exit {killed.rc})"
        temps = glob.glob(os.path.join(directory, ".*tmp*"))
        if not temps:
            return "wrong", "the killed save left no temp file to prune (injection missed the write)"
        resumed = run(script("base_train", *args, "--num-iterations", "4", "--resume"), self.env)
        got, note = classify(resumed)
        left = glob.glob(os.path.join(directory, ".*tmp*"))
        if got == "ok" and left:
            return "wrong", f"{len(left)} temp file(s) of the crashed save still there after the next saves"
        return got, note

    # -- item 8: flipped bytes in a model file --------------------------------------------------------------------

    def flipped(self, resume: bool):
        tag = "flipr" if resume else "flipc"
        directory = self.copy_tag("a", tag)
        path = os.path.join(directory, f"model_{meta_steps(directory)[-1]:06d}.pt")
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            start = len(data) // 3
            for i in range(100):  # inside the tensor data, away from the zip headers
                data[start + 37 * i] ^= 0x5A
            f.seek(0)
            f.write(data)
        if resume:
            proc = self.base_train(tag, "--num-iterations", "6", "--save-every", "2", "--resume", *KEEP_ALL)
        else:
            proc = run(script("chat_cli", "--stage", "base", "--tag", tag, "-p", "hi", "--max-tokens", "4",
                              "--temperature", "0", "--device", "cpu"), self.env)
        got, note = classify(proc)
        if got == "ok":
            return "poisoned_checkpoint", "the damaged weights were used without a word"
        return got, note

    # -- item 11: wandb offline ------------------------------------------------------------------------------------

    def wandb_offline(self):
        wandb_dir = os.path.join(self.root, "wandb_root")
        os.makedirs(wandb_dir, exist_ok=True)
        env = dict(self.env, WANDB_MODE="offline", WANDB_DIR=wandb_dir, WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
        proc = self.base_train("wandb", "--num-iterations", "1", "--run", "attack-matrix", env=env)
        got, note = classify(proc)
        runs = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))
        if got == "ok" and not runs:
            return "wrong", "exit 0 but no offline wandb run was written"
        return got, note

    # -- items 6 and 9: the server ---------------------------------------------------------------------------------

    def server_attacks(self):
        names = ["api: temperature 1e-39 is greedy", "api: top_p 1e-46 keeps the most likely token",
                 'api: "n": true', 'api: "max_tokens": true', 'api: "seed": false',
                 "api: half-sent body, then silence", "api: --port 0 banner shows the bound port"]
        if not any(self.wanted(n) for n in names):
            return
        start = time.monotonic()
        extra = ["--body-timeout", "2"] if "--body-timeout" in run(script("chat_web", "--help"), self.env).out else []
        process, port, banner = self._start_server("0", extra)
        if port is None:
            got, note = self._server_failure(process, start)
            for n in names:
                self.record("9" if "body" in n or "port" in n else "6", n, "ok", got, note, time.monotonic() - start)
            return
        self.record("9", names[6], "ok", "ok" if port else "wrong", banner[-60:], time.monotonic() - start)
        if port == 0:  # the banner does not tell where it listens: serve again on a port chosen here
            self._stop_server(process)
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                free = probe.getsockname()[1]
            process, port, _ = self._start_server(str(free), extra)
            if port is None:
                return
        try:
            self._api_checks(f"http://127.0.0.1:{port}", names)
            self._half_body(port, names[5])
        finally:
            err = self._stop_server(process)
        if "Traceback (most recent call last)" in err:
            self.record("6", "api: server log after the attacks", "ok", "traceback", err.strip().splitlines()[-1])

    def _start_server(self, port: str, extra: list[str]):
        """(process, port from its banner or None, banner line) of chat_web serving checkpoint a, once it accepts."""
        process = subprocess.Popen(script("chat_web", "--stage", "base", "--tag", "a", "--port", port, "--device",
                                          "cpu", "--workers", "1", *extra),
                                   env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                return process, None, ""
            match = re.search(r"API http://[^\s:]+:(\d+)/v1", line)
            if match:
                bound = int(match.group(1))
                for _ in range(200):  # the banner comes just before uvicorn accepts
                    try:
                        socket.create_connection(("127.0.0.1", bound or int(port)), timeout=1).close()
                        break
                    except OSError:
                        time.sleep(0.1)
                return process, bound, line.strip()
        return process, None, ""

    def _server_failure(self, process, start: float) -> tuple[str, str]:
        process.kill()
        err = process.stderr.read()
        return classify(Proc(process.wait(), "", err, time.monotonic() - start))

    @staticmethod
    def _stop_server(process) -> str:
        process.terminate()
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        return err or ""

    def _post(self, url: str, body: dict) -> tuple[int, dict]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def _api_checks(self, url: str, names: list[str]):
        messages = [{"role": "user", "content": "What is 3 times 7?"}]

        def reply(**fields):
            status, body = self._post(url, {"messages": messages, "max_tokens": 12, **fields})
            if status != 200:
                return None, f"status {status}: {str(body)[:80]}"
            message = body["choices"][0]["message"]
            return (message.get("reasoning_content"), message.get("content")), ""

        greedy, _ = reply(temperature=0)
        for name, fields in ((names[0], {"temperature": 1e-39, "seed": 3}),
                             (names[1], {"temperature": 1.0, "top_p": 1e-46, "seed": 3})):
            if not self.wanted(name):
                continue
            start = time.monotonic()
            got_reply, note = reply(**fields)
            got = "ok" if got_reply is not None and got_reply == greedy else ("wrong" if got_reply is not None
                                                                              else "clean_error")
            self.record("6", name, "ok", got, note or ("" if got == "ok" else "differs from the greedy reply"),
                        time.monotonic() - start)
        for name, fields in ((names[2], {"n": True}), (names[3], {"max_tokens": True}), (names[4], {"seed": False})):
            if not self.wanted(name):
                continue
            start = time.monotonic()
            status, body = self._post(url, {"messages": messages, **fields})
            error = body.get("error") if isinstance(body, dict) else None
            if status == 400 and error and error.get("param") == next(iter(fields)):
                got, note = "clean_error", error.get("message", "")[:90]
            elif status >= 500:
                got, note = "traceback", f"status {status}"
            else:
                got, note = "wrong", f"status {status}: accepted"
            self.record("6", name, "clean_error", got, note, time.monotonic() - start)

    def _half_body(self, port: int, name: str):
        if not self.wanted(name):
            return
        start = time.monotonic()
        body = b'{"messages": [{"role": "user", "content": "hi"}]}'
        data = b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (len(body) + 100) + body)
            sock.settimeout(20)
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except (socket.timeout, TimeoutError):
                self.record("9", name, "clean_error", "hang", "connection still open after 20 s",
                            time.monotonic() - start)
                return
        status = data.split(b"\r\n", 1)[0].decode(errors="replace")
        got = "clean_error" if " 408" in status else "wrong"
        self.record("9", name, "clean_error", got, f"{status}, closed", time.monotonic() - start)

    # -- items 3 and 10: the grader ---------------------------------------------------------------------------------

    def grader(self):
        if not self.wanted("grader"):
            return
        proc = run([PY, os.path.join(HARNESS, "dev", "attack_matrix.py"), "--probe-grader"], self.env, timeout=600)
        rows = [json.loads(line) for line in proc.out.splitlines() if line.startswith("{")]
        if proc.rc != 0 and not rows:
            got, note = classify(proc)
            self.record("3", "grader: probe", "ok", got, note, proc.seconds)
        for row in rows:
            self.record(row["item"], row["name"], row["expected"], row["got"], row["note"], row["seconds"])

    # -- all -------------------------------------------------------------------------------------------------------

    def run_all(self):
        self.setup()
        self.attack("1", "new run into a tag holding another run's steps", "clean_error", self.tag_reuse)
        self.attack("2", "lr 3e38 (finite weights overflow after a step)", "clean_error",
                    lambda: self.huge_lr("lr3e38", "3e38"))
        self.attack("5", "lr 1e39 (finite in float64, inf in float32)", "clean_error",
                    lambda: self.huge_lr("lr1e39", "1e39"))
        self.attack("4", "--resume with a torn last line in the metrics log", "ok",
                    lambda: self.damaged_log("torn", b'{"step": 5, "loss": 1.2'))
        self.attack("4", "--resume with a metrics line nested 100k deep", "ok|clean_error",
                    lambda: self.damaged_log("deeplog", b"[" * 100_000 + b"]" * 100_000 + b"\n"))
        good = json.dumps({"problem": "1+1?", "thinking": "1+1=2", "answer": "2"}).encode() + b"\n"
        self.attack("5", "customjson with invalid UTF-8", "clean_error",
                    lambda: self.customjson(good + b'{"problem": "caf\xe9", "answer": "2"}\n'))
        self.attack("5", "customjson line nested 100k deep", "clean_error",
                    lambda: self.customjson(good + b"[" * 100_000 + b"]" * 100_000 + b"\n"))
        self.attack("5", "read-only base dir", "clean_error", self.read_only_base)
        self.attack("5", "base dir under a regular file", "clean_error", self.base_under_file)
        self.attack("5", "disk full during a checkpoint write (tmpfs)", "clean_error", self.disk_full)
        self.attack("5", "garbage tokenizer.tiktoken", "clean_error",
                    lambda: self.garbage_tokenizer("tokenizer.tiktoken", bytes(range(256)) * 8))
        self.attack("5", "garbage tokenizer.json", "clean_error",
                    lambda: self.garbage_tokenizer("tokenizer.json", bytes(range(256)) * 8))
        self.attack("5", "tokenizer.json nested 100k deep", "clean_error",
                    lambda: self.garbage_tokenizer("tokenizer.json", b"[" * 100_000 + b"]" * 100_000))
        self.attack("5", "checkpoint meta: model_config.n_embd a string: chat", "clean_error",
                    lambda: self.bad_meta(lambda m: m["model_config"].__setitem__("n_embd", "32")))
        self.attack("5", "checkpoint meta: model_config a list: --resume", "clean_error",
                    lambda: self.bad_meta(lambda m: m.__setitem__("model_config", [1, 2]), resume=True))
        self.attack("7", "SIGKILL inside a model write, then --resume", "ok", self.crashed_save)
        self.attack("8", "100 flipped bytes in a model file: chat", "clean_error", lambda: self.flipped(False))
        self.attack("8", "100 flipped bytes in a model file: --resume", "clean_error", lambda: self.flipped(True))
        self.attack("11", "wandb offline run with --run NAME", "ok", self.wandb_offline)
        self.server_attacks()
        self.grader()


# ----------------------------------------------------------------------------------------------- grader probe

def probe_grader():
    """Run in a subprocess: the pathological set through the RL reward and the eval grading path; one JSON per row."""
    from reasoning.evaluation import grade_completion
    from reasoning.rewards import Completion
    from reasoning.grader_pool import warm_up_grader
    from reasoning.verifiers import math_equal
    from scripts.chat_rl import RLConfig, build_reward
    from tasks.math import MathProblems
    from tasks.synthetic import SyntheticReasoning

    warm_up_grader()
    bound_s = 3.0
    cases = {
        "\\boxed{ nested 1000 deep": "\\boxed{" * 1000 + "5" + "}" * 1000,
        "\\boxed{ nested 5000 deep": "\\boxed{" * 5000 + "5" + "}" * 5000,
        "\\frac{ nested 5000 deep": "\\boxed{" + "\\frac{" * 5000 + "1" + "}{2}" * 5000 + "}",
        "braces nested 5000 deep": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
        "100k-character answer": "\\boxed{" + "1+" * 50_000 + "1}",
        "100k-digit integer": "\\boxed{" + "9" * 100_000 + "}",
        "unbalanced braces": "\\boxed{" + "}" * 1000 + "{" * 1000,
        "unicode, NUL, lone surrogate": "\\boxed{π√∞\x00\ud800😀}",
    }
    reward = build_reward(RLConfig(overlong_buffer=4, max_new_tokens=16))
    math_task = MathProblems([{"problem": "?", "solution": "\\boxed{5}", "answer": "5"}], "MATH", "test")
    synthetic = SyntheticReasoning("test", size=1, seed=0)

    def emit(item, name, expected, got, note, seconds):
        print(json.dumps({"item": item, "name": name, "expected": expected, "got": got, "note": note,
                          "seconds": seconds}), flush=True)

    for case, text in cases.items():
        for path, fn in (("RL reward", lambda t: reward([Completion(text=t, num_tokens=8)], [{"answer": "5"}])),
                         ("eval grading", lambda t: (grade_completion(math_task, math_task[0], t),
                                                     grade_completion(synthetic, synthetic[0], t)))):
            start = time.monotonic()
            try:
                fn(text)
                seconds = time.monotonic() - start
                got, note = ("ok", "") if seconds <= bound_s else ("hang", f"{seconds:.1f}s > {bound_s:g}s bound")
            except BaseException as e:  # noqa: BLE001 (the point is to see anything at all)
                seconds = time.monotonic() - start
                got, note = "traceback", f"{type(e).__name__}: {str(e)[:80]}"
            emit("3", f"grader: {case} via {path}", "ok", got, note, seconds)
    for pred in ("7 \\\\", "7\\quad", "\\\\ 7"):
        start = time.monotonic()
        equal = math_equal("7", pred)
        emit("10", f"grader: 7 == {pred}", "ok", "ok" if equal else "wrong", "" if equal else "graded different",
             time.monotonic() - start)


# ----------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated substrings of attack names to run")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--repo", default=None, help="attack the scripts of this checkout (default: this one)")
    parser.add_argument("--probe-grader", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global REPO
    REPO = os.path.abspath(args.repo) if args.repo else HARNESS
    if args.probe_grader:
        probe_grader()
        return
    root = args.keep or tempfile.mkdtemp(prefix="attack_matrix_")
    os.makedirs(root, exist_ok=True)
    start = time.monotonic()
    matrix = Matrix(root, args.only.split(",") if args.only else None)
    try:
        matrix.run_all()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results = matrix.results
    counts = {o: sum(r.got == o for r in results) for o in OUTCOMES}
    failed = [r for r in results if not (r.got == r.expected or (r.expected == "ok|clean_error"
                                                                 and r.got in ("ok", "clean_error")))]
    print(f"\n{'item':>4}  {'attack':58s} {'expected':15s} {'got':19s}")
    for r in results:
        mark = "!!" if r in failed else "  "
        print(f"{mark}{r.item:>3}  {r.name[:58]:58s} {r.expected:15s} {r.got:19s}")
    print(f"\n{len(results)} attacks in {time.monotonic() - start:.0f}s; {len(failed)} not as expected; "
          + ", ".join(f"{o} {n}" for o, n in counts.items() if n))
    print(f"RESULT attacks={len(results)} clean_errors={counts['clean_error']} tracebacks={counts['traceback']} "
          f"lost_checkpoints={counts['lost_checkpoint']} poisoned_checkpoints={counts['poisoned_checkpoint']} "
          f"ok={counts['ok']} wrong={counts['wrong']} hangs={counts['hang']} skipped={counts['skipped']} "
          f"not_as_expected={len(failed)}")


if __name__ == "__main__":
    main()
