"""scripts.chat_cli as a user runs it: a subprocess over a saved checkpoint. One-shot -p prints exactly the
engine's greedy reply (think span marked); the REPL driven through a pipe keeps history, forgets it on /clear
and stops at /quit; on a terminal (pty), Ctrl-C stops a reply and the session carries on."""

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from reasoning.chat import conversation_from_messages
from reasoning.checkpoint import checkpoint_dir, load_model, save_checkpoint
from reasoning.common import run_main
from test_chat_api import STOP_NAMES, chat_model, one_torch_thread, reference_segments, small_tokenizer  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny sft checkpoint whose greedy replies never end by themselves (stop-token logits are 0 while
    some other logit is always larger), so every reply is exactly --max-tokens long."""
    base = str(tmp_path_factory.mktemp("chat_cli"))
    tokenizer = small_tokenizer()
    tokenizer.save(os.path.join(base, "tokenizer"))
    model = chat_model(tokenizer, max_seq_len=2048)
    with torch.no_grad():
        model.lm_head.weight[[tokenizer.encode_special(n) for n in STOP_NAMES]] = 0.0
    ckpt = checkpoint_dir("sft", "tiny", base)
    save_checkpoint(ckpt, 7, model.state_dict(), meta={"model_config": model.config.to_dict(),
                                                       "tokenizer_dir": os.path.join(base, "tokenizer")})
    model, tokenizer, _ = load_model(ckpt, device="cpu")
    return base, ckpt, model, tokenizer


def start_cli(base, *args, terminal=None):
    """Launch the CLI; stdin/stdout are pipes, or the given pty slave fd."""
    env = {**os.environ, "REASONING_BASE_DIR": base, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8",
           "TERM": "xterm"}
    streams = dict(stdin=terminal, stdout=terminal, stderr=terminal) if terminal is not None else \
        dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", *args], cwd=REPO, env=env, **streams)


def finish(process, stdin=""):
    """(exit code, stdout, stderr); bytes decoded by hand because text mode would turn the "\r" that random
    models print into "\n"."""
    out, err = process.communicate(stdin.encode(), timeout=240)
    return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def launched(saved):
    """The three CLI processes start together: their time is mostly importing torch, which overlaps."""
    base, ckpt, *_ = saved
    master, slave = pty.openpty()
    flags = ["--temperature", "0", "--max-tokens"]
    processes = {
        "one_shot": start_cli(base, "--stage", "sft", "-p", "hello there", *flags, str(MAX_TOKENS)),
        "repl": start_cli(base, "--init-from", ckpt, *flags, str(MAX_TOKENS)),
        "terminal": start_cli(base, "--init-from", ckpt, *flags, "2000", terminal=slave),
    }
    os.close(slave)
    yield processes, master
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()
    os.close(master)


def printed(segments):
    """How a reply appears when stdout is not a terminal: the think span between [thinking] tags."""
    out, thinking = "", False
    for channel, text in segments:
        if (channel == "reasoning") != thinking:
            out += "[thinking] " if not thinking else " [/thinking]\n"
            thinking = not thinking
        out += text
    return out + (" [/thinking]" if thinking else "") + "\n"


def greedy(model, tokenizer, messages, max_tokens=MAX_TOKENS):
    ids = tokenizer.render_for_completion(conversation_from_messages(messages))
    return reference_segments(model, tokenizer, ids, max_tokens=max_tokens, temperature=0.0, seed=0)[0]


def as_history(question, segments):
    text = {"reasoning": "", "content": ""}
    for channel, part in segments:
        text[channel] += part
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": text["content"], "reasoning_content": text["reasoning"]}]


@pytest.mark.slow
def test_one_shot_prints_the_greedy_reply(saved, launched):
    base, ckpt, model, tokenizer = saved
    expected = greedy(model, tokenizer, [{"role": "user", "content": "hello there"}])
    assert expected
    code, stdout, stderr = finish(launched[0]["one_shot"])
    assert code == 0, stderr
    assert stdout == printed(expected)


@pytest.mark.parametrize("flags, named", [(["--temperature", "5"], "--temperature"), (["--top-p", "0"], "--top-p"),
                                          (["--max-tokens", "0"], "--max-tokens"), (["-p", " "], "--prompt"),
                                          (["--init-from", "/no/such/dir"], "--init-from")])
def test_bad_flags_fail_with_one_line(saved, monkeypatch, capsys, flags, named):
    from scripts import chat_cli

    monkeypatch.setenv("REASONING_BASE_DIR", saved[0])
    monkeypatch.setattr(sys, "argv", ["chat_cli", "-p", "hi", *flags])
    with pytest.raises(SystemExit) as exit_info:
        run_main(chat_cli.main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and named in err, err


@pytest.mark.slow
def test_repl_through_a_pipe_keeps_history_clears_and_quits(saved, launched):
    base, ckpt, model, tokenizer = saved
    for i in range(20):  # a question whose second asking really depends on the history (else /clear is untested)
        q1, q2 = f"what is {i} plus {i}?", "and times two?"
        r1 = greedy(model, tokenizer, [{"role": "user", "content": q1}])
        r1_with_history = greedy(model, tokenizer, as_history(q1, r1) + [{"role": "user", "content": q1}])
        if r1 and r1_with_history != r1:
            break
    else:
        pytest.fail("no question whose reply depends on the history")
    r2 = greedy(model, tokenizer, as_history(q1, r1) + [{"role": "user", "content": q2}])
    stdin = f"{q1}\n/clear\n{q1}\n{q2}\n/temp 0.5\n/think off\n/quit\nnever answered\n"
    code, stdout, stderr = finish(launched[0]["repl"], stdin)
    assert code == 0, stderr
    assert stdout == (printed(r1) + "[conversation cleared]\n" + printed(r1) + printed(r2)
                             + "[temperature 0.5]\n[thinking hidden]\n")


def read_until(fd, needle: bytes, buffer: bytearray, start: int = 0, timeout: float = 60.0) -> int:
    """Read the pty into buffer until needle appears at or after `start`; returns the index just past it."""
    deadline = time.monotonic() + timeout
    while buffer.find(needle, start) < 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} not seen; output so far: {bytes(buffer[-500:])!r}")
        if select.select([fd], [], [], remaining)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"output ended before {needle!r}: {bytes(buffer[-500:])!r}")
            buffer.extend(chunk)
    return buffer.find(needle, start) + len(needle)


@pytest.mark.slow
def test_ctrl_c_on_a_terminal_interrupts_the_reply_not_the_session(launched):
    processes, master = launched
    process = processes["terminal"]
    output = bytearray()
    try:
        position = read_until(master, b"you> ", output)
        os.write(master, b"count to a million\n")
        reply_start = read_until(master, b"assistant> ", output, position)
        while len(output) < reply_start + 20:  # wait until some of the reply has streamed
            assert select.select([master], [], [], 30)[0], "the reply did not stream"
            output.extend(os.read(master, 4096))
        os.kill(process.pid, signal.SIGINT)  # what Ctrl-C on the terminal does
        reply_end = read_until(master, b"[interrupted]", output, reply_start)
        position = read_until(master, b"you> ", output, reply_end)  # the session goes on
        os.write(master, b"/temp 0.3\n")
        read_until(master, b"[temperature 0.3]", output, position)
        os.write(master, b"/quit\n")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert b"chatting with tiny@7" in output  # the terminal greeting names the checkpoint
    # cut short: the full reply is 2000 tokens (several KB); the interrupted one stopped long before
    assert reply_end - reply_start < 2000, reply_end - reply_start


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A checkpoint whose context (48 tokens) is shorter than the default reply length (512), as runcpu's are."""
    base = str(tmp_path_factory.mktemp("chat_cli_short"))
    tokenizer = small_tokenizer()
    tokenizer.save(os.path.join(base, "tokenizer"))
    model = chat_model(tokenizer, max_seq_len=48)
    with torch.no_grad():  # greedy replies never end by themselves: each runs to its length limit
        model.lm_head.weight[[tokenizer.encode_special(n) for n in STOP_NAMES]] = 0.0
    ckpt = checkpoint_dir("sft", "short", base)
    save_checkpoint(ckpt, 1, model.state_dict(), meta={"model_config": model.config.to_dict(),
                                                       "tokenizer_dir": os.path.join(base, "tokenizer")})
    model, tokenizer, _ = load_model(ckpt, device="cpu")
    return ckpt, model, tokenizer


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """scripts.chat_cli in this process: (exit code, stdout, stderr)."""
    from scripts import chat_cli

    monkeypatch.setattr(sys, "argv", ["chat_cli", *argv])
    try:
        run_main(chat_cli.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_default_reply_length_fits_the_context_explicit_one_is_checked(short_context, monkeypatch, capsys):
    ckpt, model, tokenizer = short_context
    messages = [{"role": "user", "content": "hello there"}]
    room = 48 - len(tokenizer.render_for_completion(conversation_from_messages(messages)))
    code, out, err = run_cli(monkeypatch, capsys, "--init-from", ckpt, "-p", "hello there", "--temperature", "0")
    assert code == 0, err
    expected = greedy(model, tokenizer, messages, max_tokens=room)
    assert out == printed(expected)  # the reply used all the room the context left, no error
    assert greedy(model, tokenizer, messages, max_tokens=room - 1) != expected  # ...and that room, not less

    code, out, err = run_cli(monkeypatch, capsys, "--init-from", ckpt, "-p", "hello there", "--max-tokens",
                             str(room + 1))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --max-tokens: {room + 1} does not fit") and f"at most {room}" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "--init-from", ckpt, "-p", "hi", "--max-tokens", "49")
    assert code == 2 and "--max-tokens 49: longer than the model's context (48 tokens)" in err, err
