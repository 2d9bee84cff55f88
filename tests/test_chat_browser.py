"""The chat UI (reasoning/ui.html) in a real headless Chromium driven by selenium: the page loads with no
console errors (the Content-Security-Policy would report any outside resource), a typed message streams a
reply into the page while the Stop button is up, Stop aborts a reply and frees the server's worker, and
Regenerate replaces the last reply. A screenshot is saved to tmp (and to $REASONING_ARTIFACTS when set).

Needs /usr/bin/chromium and /usr/bin/chromedriver (`bash runs/install_chromium.sh`); skipped without them.
"""

import os
import shutil
import time

import httpx
import pytest

from reasoning.chat_server import ServerThread, create_app
from test_chat_api import chat_model, one_torch_thread, small_tokenizer  # noqa: F401 (fixture)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason=f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER}: run "
                              "`bash runs/install_chromium.sh` (apt packages chromium, chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")


@pytest.fixture(scope="module")
def server():
    tokenizer = small_tokenizer()
    # never stops by itself: every reply streams until max_tokens, long enough to watch it arrive and to stop it
    model = chat_model(tokenizer, max_seq_len=4096, endless=True)
    app = create_app(model, tokenizer, workers=1, max_queue=4, default_max_tokens=2000, model_name="tiny-ui")
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def reply_text(driver):
    """Everything the last assistant message shows (answer and thinking)."""
    return driver.execute_script(
        "const m = [...document.querySelectorAll('.msg.assistant')].pop();"
        "return m ? m.querySelector('.content').textContent + m.querySelector('.thinking').textContent : '';")


def stop_visible(driver):
    return driver.find_element("id", "stop").is_displayed()


def set_field(driver, element_id, value):
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def test_ui_streams_a_reply_stops_and_regenerates(server, browser, tmp_path):
    driver = browser
    driver.get(server.url + "/")
    wait_for(lambda: "tiny-ui" in driver.find_element("id", "model").text, what="the model name from /v1/models")
    max_tokens = driver.find_element("id", "max-tokens")  # empty = the server's choice, shown from /v1/models
    assert max_tokens.get_attribute("value") == "" and max_tokens.get_attribute("placeholder") == "auto (≤ 2000)"
    assert max_tokens.get_attribute("max") == "4096"
    set_field(driver, "max-tokens", "1000")

    # 1. send: text appears while the reply is still streaming, and keeps growing until it ends
    driver.find_element("id", "input").send_keys("Hello, model!")
    driver.find_element("id", "send").click()
    mid_stream = wait_for(lambda: stop_visible(driver) and len(reply_text(driver)) > 0 and reply_text(driver),
                          what="the first streamed text")
    wait_for(lambda: not stop_visible(driver), what="the end of the reply")
    final = reply_text(driver)
    assert len(final) > len(mid_stream) and final.startswith(mid_stream[:1])
    assert "1000 tokens" in driver.find_element("css selector", ".msg.assistant .status").text
    user_messages = driver.find_elements("css selector", ".msg.user .content")
    assert [m.text for m in user_messages] == ["Hello, model!"]
    screenshot = tmp_path / "chat_ui.png"
    driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 1000
    if os.environ.get("REASONING_ARTIFACTS"):
        os.makedirs(os.environ["REASONING_ARTIFACTS"], exist_ok=True)
        shutil.copy(screenshot, os.path.join(os.environ["REASONING_ARTIFACTS"], "chat_ui.png"))

    # 2. a second turn (multi-turn history) with the reply length left to the server (the default 2000, or what
    # the context leaves after the history if less), stopped mid-stream: the worker is freed on the server
    set_field(driver, "max-tokens", "")
    driver.find_element("id", "input").send_keys("Tell me more.\n")  # Enter sends
    wait_for(lambda: len(driver.find_elements("css selector", ".msg.assistant")) == 2 and reply_text(driver),
             what="the second reply to start")
    driver.find_element("id", "stop").click()
    wait_for(lambda: driver.find_elements("css selector", ".msg.assistant")[-1]
             .find_element("css selector", ".status").text == "stopped", what="the 'stopped' status")
    stats = wait_for(lambda: (s := httpx.get(server.url + "/stats").json())["busy_workers"] == 0 and s,
                     timeout=15, what="the worker to be released")
    assert stats["requests_cancelled"] >= 1 and stats["requests_served"] >= 1
    stopped_text = reply_text(driver)

    # 3. regenerate replaces the (stopped) last reply with a fresh one
    set_field(driver, "max-tokens", "8")
    driver.find_element("css selector", ".regenerate").click()
    wait_for(lambda: not stop_visible(driver) and "8 tokens" in driver.find_elements(
        "css selector", ".msg.assistant .status")[-1].text, what="the regenerated reply")
    assert len(driver.find_elements("css selector", ".msg.assistant")) == 2
    assert reply_text(driver) != stopped_text

    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe  # no CSP violations, no script errors, no failed loads
