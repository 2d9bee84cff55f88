"""The newcomer's path with every default: `bash runs/runcpu.sh` (at micro sizes), then each command of the README's
"Chatting" section as written there, on the model that run just trained: the one-shot CLI, the CLI REPL on a
pseudo-terminal, the web page in a real headless browser, and the `openai` client snippet.

Micro runcpu models have a 192-token context, shorter than the default reply length (512), so the reply-length
defaults are exercised as they are on a real runcpu model (256 tokens). The runcpu run is the session's `runcpu`
fixture (conftest.py), shared with test_pipeline. The commands are read out of README.md, so a README edit that
breaks them fails here. Replies of a model trained for a few steps are gibberish: what is checked is that an answer
arrives and no error does.
"""

import os
import pty
import re
import select
import shlex
import socket
import subprocess
import time

import httpx
import pytest

from test_chat_browser import CHROMEDRIVER, CHROMIUM, browser, reply_text, stop_visible, wait_for  # noqa: F401
from test_pipeline import REPO, SEQ_LEN

pytestmark = pytest.mark.slow

with open(os.path.join(REPO, "README.md"), encoding="utf-8") as _f:
    README = _f.read()
CHATTING = README.split("\n## Chatting\n", 1)[1].split("\n## ", 1)[0]
QUESTION = "What is 7 plus 5, then times 3? Put the answer in \\boxed{}."


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", CHATTING, flags=re.S)


def inline_command(label: str) -> str:
    """The command a paragraph starts with: **Terminal.** `python -m scripts.chat_cli` ..."""
    return re.search(rf"\*\*{label}\.\*\* `([^`]+)`", CHATTING).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chat_env(runcpu):
    """The shell a newcomer has after the README's setup block, pointed at the runcpu fixture's run."""
    base, env, _ = runcpu
    setup = next(block for block in code_blocks("bash") if "REASONING_BASE_DIR" in block)
    # `source .venv/bin/activate`: the interpreter running pytest plays the venv's python (it is the venv's under
    # runs/test.sh; env's PATH puts it first). The exported folder is runcpu.sh's default run folder, which the
    # test's run is not (it lives in tmp), so the README's path is checked against runcpu.sh's default instead.
    assert "source .venv/bin/activate" in setup
    exported = re.search(r"export REASONING_BASE_DIR=~/(\S+)", setup).group(1)
    with open(os.path.join(REPO, "runs", "runcpu.sh")) as f:
        assert f"REASONING_BASE_DIR:-$HOME/{exported}}}" in f.read()
    return {**env, "REASONING_BASE_DIR": str(base), "TERM": "xterm", "PYTHONIOENCODING": "utf-8"}


@pytest.fixture(scope="module")
def launched(chat_env):
    """The README's three commands start together (their time is mostly importing torch, which overlaps)."""
    one_shot = next(block for block in code_blocks("bash") if "-p " in block).strip()
    repl_command = inline_command("Terminal")
    web_command = inline_command("Web")
    assert "scripts.chat_cli" in one_shot and repl_command == "python -m scripts.chat_cli"
    assert web_command == "python -m scripts.chat_web" and "http://127.0.0.1:8000/" in CHATTING
    port = free_port()
    master, slave = pty.openpty()
    processes = {
        "one_shot": subprocess.Popen(["bash", "-c", one_shot], cwd=REPO, env=chat_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE),
        "repl": subprocess.Popen(shlex.split(repl_command), cwd=REPO, env=chat_env, stdin=slave, stdout=slave,
                                 stderr=slave),
        # --port: 8000 may be taken on a shared machine (or by a parallel test run); the rest is as written
        "web": subprocess.Popen(shlex.split(web_command) + ["--port", str(port)], cwd=REPO, env=chat_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
    }
    os.close(slave)
    yield processes, master, f"http://127.0.0.1:{port}"
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()
    os.close(master)


@pytest.fixture(scope="module")
def web(launched):
    """The chat_web server's URL once it answers /health."""
    processes, _, url = launched
    deadline = time.monotonic() + 120
    while True:
        assert processes["web"].poll() is None, processes["web"].stdout.read().decode()[-2000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "chat_web did not come up"
        time.sleep(0.2)


def test_cli_one_shot_as_written_answers(launched):
    process = launched[0]["one_shot"]
    out, err = process.communicate(timeout=240)
    out, err = out.decode(), err.decode()
    assert process.returncode == 0, err[-2000:]
    assert out.strip() and "[empty reply" not in out, (out, err)
    assert "error" not in err, err


def read_until(fd, needle: bytes, buffer: bytearray, start: int = 0, timeout: float = 120.0) -> int:
    """Read the pty into buffer until needle appears at or after `start`; returns the index just past it."""
    deadline = time.monotonic() + timeout
    while buffer.find(needle, start) < 0:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{needle!r} not seen; output so far: {bytes(buffer[-800:])!r}"
        if select.select([fd], [], [], remaining)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"output ended before {needle!r}: {bytes(buffer[-800:])!r}"
            buffer.extend(chunk)
    return buffer.find(needle, start) + len(needle)


def test_cli_repl_on_a_terminal_answers_and_quits(launched):
    processes, master, _ = launched
    output = bytearray()
    position = read_until(master, b"you> ", output)
    assert b"chatting with sft:d1@" in output  # the newest SFT checkpoint, as the README says
    os.write(master, QUESTION.encode() + b"\n")
    reply_start = read_until(master, b"assistant> ", output, position)
    reply_end = read_until(master, b"you> ", output, reply_start)
    reply = re.sub(rb"\x1b\[[0-9;]*m", b"", bytes(output[reply_start:reply_end - len(b"you> ")])).strip()
    assert reply and b"error" not in reply and b"[empty reply" not in reply, reply
    os.write(master, b"/quit\n")
    assert processes["repl"].wait(timeout=30) == 0


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason=f"needs {CHROMIUM} and {CHROMEDRIVER}: run `bash runs/install_chromium.sh`")
def test_web_page_with_all_defaults_answers(web, browser):
    driver = browser
    driver.get(web + "/")
    model = wait_for(lambda: "context" in (text := driver.find_element("id", "model").text) and text,
                     what="the model card from /v1/models")
    assert model.startswith("sft:d1@") and f"context {SEQ_LEN} tokens" in model, model
    driver.find_element("id", "input").send_keys(QUESTION + "\n")  # Enter sends
    wait_for(lambda: driver.find_elements("css selector", ".msg.assistant") and not stop_visible(driver)
             and driver.find_element("css selector", ".msg.assistant .status").text, timeout=120,
             what="the reply to finish")
    message = driver.find_element("css selector", ".msg.assistant")
    status = message.find_element("css selector", ".status").text
    assert "error" not in message.get_attribute("class") and "error" not in status, status
    assert reply_text(driver).strip() and "tokens" in status, status
    # the page's own defaults stayed untouched: max tokens left to the server, which fits the reply to the context
    assert driver.find_element("id", "max-tokens").get_attribute("value") == ""
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe


def test_openai_snippet_as_written_runs(web, capsys):
    snippet = next(block for block in code_blocks("python") if "from openai import OpenAI" in block)
    # the README's server listens on port 8000; this one on a free port. Its api_key stays: no --api-key is set
    code = snippet.replace("http://127.0.0.1:8000/v1", web + "/v1")
    assert code != snippet
    exec(compile(code, "README.md (Chatting: openai snippet)", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 2, printed  # the reply, its thinking (or None), then the streamed reply
