"""End to end: `bot demo` in a subprocess, driven in Debian's chromium with Playwright.

Needs /usr/bin/chromium (`apt-get install chromium`) and the three trained default adapters.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 180
TURN_TIMEOUT_MS = 240_000  # a chat reply on a busy 2-core CPU can take a while
SCREENSHOT = REPO / "reports" / "demo.png"

CASES = [
    ("Hi! How are you doing today?", "chat"),
    ("Terrible product, the blender broke after two days. Avoid.", "sentiment"),
    ("Chelsea striker scores hat-trick as Blues thrash Leeds in Premier League", "topic"),
]
PARALLEL_CASES = [
    ("Hi! How was your weekend?", "chat"),
    # a request to explain: the assistant route (a joke request is chat's by its route_description)
    ("Explain how a rainbow forms.", "assistant"),
    ("Stock markets tumble as the central bank raises interest rates", "topic"),
    ("Absolutely love these headphones, the sound is crisp and clear.", "sentiment"),
]


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright python package is not installed (pip install playwright)"
    untrained = [n for n in ("chat", "sentiment", "topic")
                 if not (REPO / "adapters" / n / "adapter_model.safetensors").exists()]
    if untrained:
        return f"adapters not trained yet: {', '.join(untrained)} (run `bot train NAME`)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bot_command() -> list[str]:
    script = Path(sys.executable).parent / "bot"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bot.cli"]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`bot demo` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"`bot demo` did not answer within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (its own process group, so its threads' children go too)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


_SERVER_LOG: list[Path] = []  # the running demo's log, quoted when a turn fails


@pytest.fixture(scope="module")
def server():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="bot-demo-", suffix=".log")[1])
    _SERVER_LOG[:] = [log]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as out:
        proc = subprocess.Popen([*_bot_command(), "demo", "--port", str(port)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_up(url, proc, log)
        yield url
    finally:
        _stop(proc)
        log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# ------------------------------------------------------------------ page helpers
def open_chat(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#msg textarea", timeout=60_000)
    return context, page


def send(page, text: str) -> None:
    page.fill("#msg textarea", text)
    page.click("#send")


def wait_turn(page, number: int) -> str:
    """Wait until turn ``number`` is finished; return the adapter the panel names."""
    done = f'#last-turn .turn-info[data-turn="{number}"]:not([data-adapter=""])'
    page.wait_for_selector(done, timeout=TURN_TIMEOUT_MS)
    adapter = page.get_attribute(done, "data-adapter")
    if adapter == "error":  # name the failure, not just the wrong adapter
        detail = page.locator(done).inner_text().strip()
        pytest.fail(f"turn {number} failed in the demo: {detail}\n{_SERVER_LOG[0].read_text()[-4000:]}")
    return adapter


def user_messages(page) -> list[str]:
    return [t.strip() for t in page.locator('#chat [data-testid="user"]').all_inner_texts()]


def last_reply(page) -> str:
    return page.locator('#chat [data-testid="bot"]').last.inner_text().strip()


def last_meta_title(page) -> str:
    return page.locator("#chat .thought-group .title").last.inner_text().strip()


# ------------------------------------------------------------------ tests
def test_routes_each_message_to_the_right_adapter(server, browser):
    context, page = open_chat(browser, server)
    try:
        page.click("#send")  # empty: politely ignored, nothing is added to the chat
        page.wait_for_selector('#last-turn .turn-info:has-text("Type a message to start.")')
        assert user_messages(page) == []
        for number, (text, expected) in enumerate(CASES, 1):
            send(page, text)
            assert wait_turn(page, number) == expected, f"{text!r} went to the wrong adapter"
            assert f"adapter: {expected} (" in last_meta_title(page)
            assert "runner-up" in last_meta_title(page) and " ms" in last_meta_title(page)
            assert last_reply(page), f"empty reply to {text!r}"
        assert user_messages(page) == [text for text, _ in CASES]
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        page.get_by_role("tab", name="Adapters").click()
        cards = page.locator("#adapter-cards")
        for _, name in CASES:
            assert cards.get_by_role("heading", name=name, exact=True).is_visible()
        assert "accuracy" in cards.inner_text() and "training data" in cards.inner_text()
        page.get_by_role("tab", name="Evaluation").click()
        report = page.locator("#eval-report")
        report.wait_for()
        assert report.inner_text().strip()  # the report, or how to make one
    finally:
        context.close()


def test_a_request_reaches_the_assistant_and_gets_a_full_answer(server, browser):
    """The assistant example button sends a request; the bare backbone answers it at length."""
    from playwright.sync_api import expect

    context, page = open_chat(browser, server)
    try:
        page.get_by_role("button", name=re.compile(r"^assistant: ")).first.click()
        box = page.locator("#msg textarea")
        expect(box).not_to_have_value("", timeout=15000)  # the example fills the box (async)
        request = box.input_value()
        assert request, "the assistant example did not fill the message box"
        page.click("#send")
        assert wait_turn(page, 1) == "assistant", f"{request!r} went to the wrong adapter"
        reply = last_reply(page)
        sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", reply) if len(s.split()) >= 3]
        assert len(sentences) >= 2, f"a one-sentence answer to {request!r}: {reply!r}"
        send(page, "What is the tallest mountain in Africa?")
        assert wait_turn(page, 2) == "assistant"
    finally:
        context.close()


def test_parallel_sessions_get_their_own_answers_and_history(server, browser):
    pages = [open_chat(browser, server) for _ in PARALLEL_CASES]
    try:
        for (_, page), (text, _) in zip(pages, PARALLEL_CASES, strict=True):
            send(page, text)
        for (_, page), (text, expected) in zip(pages, PARALLEL_CASES, strict=True):
            assert wait_turn(page, 1) == expected, f"{text!r} went to the wrong adapter"
            assert last_reply(page)
            assert user_messages(page) == [text]  # nobody else's message leaked in
    finally:
        for context, _ in pages:
            context.close()


def test_no_file_outside_the_app_is_served(server):
    for target in (REPO / "pyproject.toml", REPO / "reports"):
        url = f"{server}gradio_api/file={target}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                status = resp.status
        except urllib.error.HTTPError as err:
            status = err.code
        assert status != 200, f"{url} was served"
