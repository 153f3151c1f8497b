"""The web chat page at /, in Debian's headless Chromium driven by Playwright: the page
loads behind the API key (browser Basic auth), a typed prompt streams an answer in piece by
piece, tokens/s shows, nothing but this server is contacted, and the page's strict CSP
blocks nothing of its own. A screenshot goes to the test's tmp dir."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.serve.conftest import API_KEY, MODEL

CHROMIUM = "/usr/bin/chromium"
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


def test_web_chat_streams_an_answer(server, tmp_path):
    assert Path(CHROMIUM).exists(), "install Debian's chromium: apt-get install -y chromium"
    problems: list[str] = []
    foreign: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(http_credentials={"username": "kiln", "password": API_KEY},
                                          viewport={"width": 1000, "height": 700})
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(server.url) else foreign.append(r.url))

            page.goto(server.url + "/")
            page.wait_for_function(f"document.getElementById('model').textContent === {MODEL!r}")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")
            page.evaluate(RECORD_LENGTHS)
            page.fill("#prompt", "What is the capital of France?")
            page.press("#prompt", "Enter")

            page.wait_for_selector(".msg.user")
            page.wait_for_selector(".msg.assistant.done")
            answer = page.text_content(".msg.assistant")
            lengths = page.evaluate("window.__lengths")
            stats = page.text_content("#stats")
            screenshot = tmp_path / "webchat.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert "Paris" in answer
    partial = {n for n in lengths if 0 < n < len(answer)}
    assert len(partial) >= 2, f"no streaming seen: lengths {lengths}"
    assert "tok/s" in stats and not stats.startswith("0 tokens")
    assert not problems, problems  # includes any CSP violation
    assert not foreign, foreign
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    server.wait_idle()
