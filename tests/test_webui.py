"""The chat page of `dllama-mpi api`, as a person uses it: Debian's headless chromium driven by
selenium opens the page served by `mpiexec -n 2 dllama-mpi api --api-key ...` on the default model
(SmolLM2), enters the key, asks, watches the answer stream, stops a long answer, starts a new chat.
Every wait is an explicit condition (WebDriverWait), never a fixed sleep."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

from conftest import default_smollm2_or_skip
from test_api import ApiServer, health

KEY = "browser-key-42"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT = 90   # seconds, for conditions that need the model (a loaded 2-core host is slow)


def _need_browser():
    if CHROMIUM and CHROMEDRIVER:
        return
    msg = "chromium and chromedriver are needed (scripts/install.sh installs them as root with apt-get)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _need_browser()
    model, tokenizer = default_smollm2_or_skip()
    s = ApiServer(tmp_path_factory.mktemp("webui") / "server.log", model=model, tokenizer=tokenizer,
                  extra=["--api-key", KEY])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,860", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    # chromium's process-singleton directory (org.chromium.Chromium.XXXXXX) goes to TMPDIR and outlives
    # driver.quit(): kept out of /tmp
    tmp = tmp_path_factory.mktemp("chromium")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, env=dict(os.environ, TMPDIR=str(tmp))), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def get(server, path, key=None):
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_page_and_assets_load_without_the_key(server):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="/web/app.js"' in body and b"cdn" not in body.lower()
    assert "script-src 'self'" in headers["content-security-policy"]
    for path, kind in (("/web/app.js", "text/javascript"), ("/web/style.css", "text/css"),
                       ("/web/icon.svg", "image/svg+xml")):
        status, headers, _ = get(server, path)
        assert status == 200 and headers["content-type"].startswith(kind), path
    assert get(server, "/web/../api.py")[0] == 404 and get(server, "/web/nothing.js")[0] == 404
    assert get(server, "/v1/models")[0] == 401            # the API itself still wants the key
    assert get(server, "/v1/models", KEY)[0] == 200


def test_chat_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, WAIT, poll_frequency=0.05)
    find = lambda sel: d.find_element(By.CSS_SELECTOR, sel)  # noqa: E731
    answers = lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")  # noqa: E731

    def last_answer():
        msgs = answers()
        return msgs[-1] if msgs else None

    def answer_text():
        a = last_answer()
        return a.find_element(By.CLASS_NAME, "text").text if a else ""

    def answer_state():
        a = last_answer()
        return a.get_attribute("data-state") if a else None

    # the page asks for the key once; the model's name comes from /v1/models
    model_id = json.loads(get(server, "/v1/models", KEY)[2])["data"][0]["id"]
    d.get(server.url + "/")
    wait.until(lambda _: find("#key-dialog").get_attribute("open") is not None)
    find("#key-input").send_keys(KEY, Keys.ENTER)
    wait.until(lambda _: find("#model").text == model_id)
    for sel, value in (("#temperature", "0"), ("#max-tokens", "48")):
        find(sel).clear()
        find(sel).send_keys(value)

    # 1. a question (Shift+Enter makes a new line, Enter sends); the answer grows, then finishes
    box = find("#input")
    box.send_keys("Tell me about Paris, the capital of France.")
    box.send_keys(Keys.SHIFT, Keys.ENTER, Keys.SHIFT)
    box.send_keys("Write a <b>short</b> paragraph.")
    assert "\n" in box.get_attribute("value")
    box.send_keys(Keys.ENTER)
    first = wait.until(lambda _: answer_text())
    second = wait.until(lambda _: t if len(t := answer_text()) > len(first) else None)
    assert second.startswith(first)
    assert "tok/s" in find("#status").text                    # the live readout while it streams
    wait.until(lambda _: answer_state() == "done")
    answer1 = answer_text()
    assert answer1.startswith(second) and "Paris" in answer1, answer1
    user = d.find_elements(By.CSS_SELECTOR, ".msg.user .text")[-1].text
    assert user == "Tell me about Paris, the capital of France.\nWrite a <b>short</b> paragraph."
    assert not d.find_elements(By.CSS_SELECTOR, "#messages b")  # text stays text, never markup
    assert "tok/s" in last_answer().find_element(By.CLASS_NAME, "stats").text

    # copy an answer (the page writes it to the clipboard; read it back with permission granted)
    d.execute_cdp_cmd("Browser.grantPermissions", {"origin": server.url,
                                                   "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    last_answer().find_element(By.CLASS_NAME, "copy").click()
    wait.until(lambda _: last_answer().find_element(By.CLASS_NAME, "copy").text == "Copied")
    copied = d.execute_async_script("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('!' + e))")
    assert copied == answer1

    # 2. a long answer, stopped while it streams: the server stops generating and frees the sequence
    served = health(server)["served"]
    find("#max-tokens").clear()
    find("#max-tokens").send_keys("600")
    find("#input").send_keys("Write a very long story about a dragon who learns to fly.", Keys.ENTER)
    wait.until(lambda _: answer_state() == "streaming" and len(answer_text()) > 40)
    find("#stop").click()
    wait.until(lambda _: answer_state() == "stopped")
    stopped = answer_text()
    assert stopped and "stopped" in last_answer().find_element(By.CLASS_NAME, "stats").text
    h = wait.until(lambda _: (h := health(server))["served"] > served and h)
    assert h["last"]["finish_reason"] == "abort" and h["last"]["generated_tokens"] < 600, h
    assert h["queued"] == 0 and answer_text() == stopped       # nothing arrives after Stop
    assert find("#send").is_displayed() and not find("#stop").is_displayed()
    d.save_screenshot(str(tmp_path / "webui-conversation.png"))

    # 3. New chat, then the next question is answered
    find("#new-chat").click()
    assert not answers() and find("#empty").is_displayed()
    find("#input").send_keys("What is the capital of France?", Keys.ENTER)
    wait.until(lambda _: answer_state() == "done")
    assert "Paris" in answer_text() and len(answers()) == 1
    d.save_screenshot(str(tmp_path / "webui.png"))
    assert (tmp_path / "webui.png").stat().st_size > 10_000

    # the key is kept: a reload does not ask again
    d.refresh()
    wait.until(lambda _: find("#model").text == model_id)
    assert find("#key-dialog").get_attribute("open") is None
