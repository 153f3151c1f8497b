"""The web chat page at /, in Debian's headless Chromium driven by Playwright: the page
loads behind the API key (browser Basic auth), a typed prompt streams an answer in piece by
piece, tokens/s shows, nothing but this server is contacted, and the page's strict CSP
blocks nothing of its own. Markdown renders (code blocks with copy buttons, lists, emphasis)
while HTML in an answer stays text; an answer cut at the token limit says so; the stop
button ends a stream; a reload keeps the conversation; the page works opened as
http://user:key@host/. Screenshots go to each test's tmp dir.

Without Chromium these tests skip, naming the command that installs it; `.ci/run` installs
it and sets KILN_REQUIRE_BROWSER=1, which turns that skip into a failure there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.serve.conftest import API_KEY, MODEL

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
INSTALL_HINT = "web-chat tests need Debian's Chromium: apt-get install chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# Records every length the answer bubble goes through, so the test sees streaming, not
# only the final text.
RECORD_LENGTHS = """
window.__lengths = [];
new MutationObserver(() => {
  const bubble = document.querySelector('.msg.assistant');
  if (bubble) window.__lengths.push(bubble.textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""
# A reply with Markdown and with HTML that would run script if the page ever parsed it.
HOSTILE_REPLY = (
    "Here is **bold**, *emphasis* and `inline code`:\n\n"
    "```python\nprint('<b>not bold</b>')\n```\n\n"
    "- first\n- second with **strong**\n\n"
    "1. one\n2. two\n\n"
    "<img src=x onerror=\"window.__xss = 'img'\"> <script>window.__xss = 'script'</script>"
    " [bad link](javascript:window.__xss='link')"
)


def chromium_or_skip() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("KILN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{INSTALL_HINT} (KILN_REQUIRE_BROWSER=1: this run must test the web chat)")
    pytest.skip(INSTALL_HINT)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS,
                                             headless=True)
        try:
            yield browser
        finally:
            browser.close()


class PageWatch:
    """Console errors, page errors and requests to anything but the server."""

    def __init__(self, page, server_url: str) -> None:
        self.problems: list[str] = []
        self.foreign: list[str] = []
        page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(str(e)))
        page.on("request", lambda r: None if r.url.startswith(server_url) or r.url.startswith("data:")
                else self.foreign.append(r.url))


def open_page(browser, server, credentials: bool = True):
    options = {"viewport": {"width": 1000, "height": 700}}
    if credentials:
        options["http_credentials"] = {"username": "kiln", "password": API_KEY}
    context = browser.new_context(**options)
    page = context.new_page()
    page.set_default_timeout(60_000)
    return context, page, PageWatch(page, server.url)


def sse_body(text: str, finish_reason: str) -> str:
    """A chat-completions stream as the server sends it: the text in a few pieces."""
    pieces = [text[i:i + 40] for i in range(0, len(text), 40)]
    events = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None,
                            "token_ids": [1]}]} for piece in pieces]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"


def wait_until(condition, timeout: float = 60.0) -> None:
    """Poll from Python: page.wait_for_function evaluates its predicate with eval, which the
    page's CSP (rightly) forbids."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def wait_for_model(page) -> None:
    wait_until(lambda: page.text_content("#model") == MODEL)


def ask(page, text: str, max_tokens: int = 24) -> None:
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_web_chat_streams_an_answer(browser, server, tmp_path):
    context, page, watch = open_page(browser, server)
    try:
        page.goto(server.url + "/")
        wait_for_model(page)
        page.evaluate(RECORD_LENGTHS)
        ask(page, "What is the capital of France?")
        page.wait_for_selector(".msg.user")
        page.wait_for_selector(".msg.assistant.done")
        answer = page.text_content(".msg.assistant")
        lengths = page.evaluate("window.__lengths")
        stats = page.text_content("#stats")
        screenshot(page, tmp_path, "webchat.png")
    finally:
        context.close()
    assert "Paris" in answer
    partial = {n for n in lengths if 0 < n < len(answer)}
    assert len(partial) >= 2, f"no streaming seen: lengths {lengths}"
    assert "tok/s" in stats and not stats.startswith("0 tokens")
    assert not watch.problems, watch.problems  # includes any CSP violation
    assert not watch.foreign, watch.foreign
    server.wait_idle()


def test_markdown_renders_and_model_html_never_runs(browser, server, tmp_path):
    """A canned reply (routed in the browser) with Markdown, HTML and a javascript: link,
    stopped at the token limit; then a reload shows the same conversation."""
    context, page, watch = open_page(browser, server)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    try:
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, content_type="text/event-stream", body=sse_body(HOSTILE_REPLY, "length")))
        page.goto(server.url + "/")
        wait_for_model(page)
        ask(page, "Show me some markdown.")
        page.wait_for_selector(".msg.assistant.done")
        bubble = page.locator(".msg.assistant")
        assert bubble.locator("strong").first.text_content() == "bold"
        assert bubble.locator("em").first.text_content() == "emphasis"
        assert bubble.locator("p code").first.text_content() == "inline code"
        assert bubble.locator(".codeblock pre code").text_content() == "print('<b>not bold</b>')"
        assert bubble.locator(".codeblock .lang").text_content() == "python"
        assert bubble.locator("ul > li").count() == 2 and bubble.locator("ol > li").count() == 2
        assert bubble.locator("ul > li strong").text_content() == "strong"
        # The HTML is on screen as text, and none of it became an element or ran.
        assert "<img src=x onerror=\"window.__xss = 'img'\">" in bubble.text_content()
        assert "<script>window.__xss = 'script'</script>" in bubble.text_content()
        assert page.locator(".msg img, .msg script, .msg b, .msg a").count() == 0
        assert page.evaluate("window.__xss") is None
        # The copy button puts the code, not the rendered text, on the clipboard.
        page.click(".codeblock button.copy")
        wait_until(lambda: page.text_content(".codeblock button.copy") == "copied")
        assert page.evaluate("navigator.clipboard.readText()") == "print('<b>not bold</b>')"
        assert "token limit" in page.text_content(".note.length")
        screenshot(page, tmp_path, "markdown.png")

        page.reload()
        page.wait_for_selector(".msg.assistant")
        assert page.locator(".msg.user").count() == 1
        assert page.text_content(".msg.user") == "Show me some markdown."
        assert page.locator(".msg.assistant .codeblock").count() == 1
        assert page.locator(".note.length").count() == 1
        assert page.evaluate("window.__xss") is None
        screenshot(page, tmp_path, "after-reload.png")
        page.click("#clear")
        page.reload()
        wait_for_model(page)
        assert page.locator(".msg").count() == 0
    finally:
        context.close()
    assert not watch.problems, watch.problems
    assert not watch.foreign, watch.foreign


def test_stop_button_ends_the_stream(browser, server, tmp_path):
    context, page, watch = open_page(browser, server)
    try:
        page.goto(server.url + "/")
        wait_for_model(page)
        assert page.is_hidden("#stop")
        ask(page, "Write a very long story about a dragon who learns to bake bread.", max_tokens=400)
        wait_until(lambda: len(page.text_content(".msg.assistant")) > 20)
        assert page.is_visible("#stop") and page.is_hidden("#send")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant.done")
        page.wait_for_selector(".note.stopped")
        assert page.is_visible("#send") and page.is_hidden("#stop")
        stopped_text = page.text_content(".msg.assistant")
        screenshot(page, tmp_path, "stopped.png")
        stored = page.evaluate("JSON.parse(localStorage.getItem('kiln-chat-v1'))")
    finally:
        context.close()
    assert stopped_text and len(stopped_text) > 20
    assert stored[-1]["role"] == "assistant" and stored[-1]["note"] == "stopped"
    assert stored[-1]["content"].strip() and len(stored[-1]["content"]) < 400 * 8
    assert not watch.problems, watch.problems
    server.wait_idle()  # the server aborted the request when the browser hung up


def test_page_works_opened_with_credentials_in_the_url(browser, server, tmp_path):
    """http://kiln:KEY@host/: the page's own requests must not carry the URL's credentials
    (Chromium refuses those) yet still authenticate. The answer, cut at max tokens by the
    real server, is marked so."""
    context, page, watch = open_page(browser, server, credentials=False)
    host = server.url.removeprefix("http://")
    try:
        page.goto(f"http://kiln:{API_KEY}@{host}/")
        wait_for_model(page)
        # Four tokens: the real server's finish_reason "length" shows as the note.
        ask(page, "What is the capital of France?", max_tokens=4)
        page.wait_for_selector(".msg.assistant.done")
        answer = page.text_content(".msg.assistant")
        errors = page.locator(".msg.error").count()
        length_notes = page.locator(".note.length").count()
        screenshot(page, tmp_path, "credentials-in-url.png")
    finally:
        context.close()
    assert errors == 0 and answer.strip() and length_notes == 1
    assert not watch.problems, watch.problems
    server.wait_idle()


def test_without_chromium_these_tests_skip_naming_the_command_and_ci_fails(monkeypatch):
    """The README's test command on a machine without Chromium skips (saying how to get it);
    .ci/run, which installs it, sets KILN_REQUIRE_BROWSER=1 and so fails on that skip."""
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("KILN_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        chromium_or_skip()
    monkeypatch.setenv("KILN_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium.*KILN_REQUIRE_BROWSER=1"):
        chromium_or_skip()
    ci_run = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert 'KILN_REQUIRE_BROWSER=1 bash -c "$test_command"' in ci_run
