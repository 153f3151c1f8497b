"""Readiness and the server's life: loading, a full queue, a dead engine loop, a stalled one,
draining on shutdown (in-process and through a real SIGTERM), and request chat templates.

Each test starts its own server (the module uses no shared one), on the session's engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import pytest

from kiln.serve.state import ServerState, ServeSettings
from tests.serve.conftest import API_KEY, MODEL, free_port, serving

COMPLETION = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 2}


def start_stream(server, max_tokens: int, lines: list[str]) -> threading.Thread:
    """A streaming client in a thread; every SSE line it reads lands in `lines`."""
    def run():
        body = {**COMPLETION, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body,
                              headers=server.headers, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
        except httpx.HTTPError as error:
            lines.append(f"error: {error!r}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_ready_is_503_while_loading(llm_engine):
    loaded = threading.Event()

    def loader():
        loaded.wait(timeout=30)
        return llm_engine

    with serving(None, engine_loader=loader) as server:
        with server.client() as http:
            assert http.get("/health").status_code == 200
            ready = http.get("/ready")
            assert ready.status_code == 503 and "loading" in ready.json()["error"]["message"]
            busy = http.post("/v1/completions", json=COMPLETION)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            loaded.set()
            wait_for(lambda: http.get("/ready").status_code == 200, what="ready")
            assert http.post("/v1/completions", json=COMPLETION).status_code == 200
        server.engine = llm_engine
        server.wait_idle()


def test_full_queue_answers_503_with_retry_after(llm_engine):
    with serving(llm_engine, settings=ServeSettings(max_queued_requests=2)) as server:
        lines_a, lines_b = [], []
        threads = [start_stream(server, 400, lines_a), start_stream(server, 400, lines_b)]
        wait_for(lambda: server.state.in_flight == 2, what="two requests in flight")
        with server.client() as http:
            response = http.post("/v1/completions", json=COMPLETION)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert "capacity" in response.json()["error"]["message"]
            assert "kiln_requests_rejected_total" in http.get("/metrics").text
        server.server.should_exit = True  # cut the two long streams
        for thread in threads:
            thread.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
    assert not llm_engine.has_unfinished_requests()


def test_dead_engine_loop_is_reported(llm_engine, monkeypatch):
    def broken_step():
        raise RuntimeError("simulated GPU fault")

    monkeypatch.setattr(llm_engine, "step", broken_step)
    with serving(llm_engine) as server:
        with server.client() as http:
            lines = []
            start_stream(server, 8, lines).join(timeout=30)
            events = [line.removeprefix("data: ") for line in lines]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert "engine" in error["message"] and error["type"] == "service_unavailable"
            ready = http.get("/ready")
            assert ready.status_code == 503 and "engine loop has stopped" in ready.json()["error"]["message"]
            assert http.get("/health").status_code == 503
            assert http.post("/v1/completions", json=COMPLETION).status_code == 503
    monkeypatch.undo()
    assert not llm_engine.has_unfinished_requests()


def test_stall_makes_ready_fail():
    state = ServerState("m", ServeSettings(stall_timeout_s=0.5))
    state.async_engine = types.SimpleNamespace(error=None)  # all readiness looks at
    assert state.not_ready_reason() is None
    state.in_flight = 1
    state.last_progress = time.monotonic() - 1.0
    assert "no progress" in state.not_ready_reason()


def test_drain_finishes_in_flight_and_refuses_new(llm_engine):
    with serving(llm_engine, shutdown_timeout=30) as server:
        lines = []
        thread = start_stream(server, 12, lines)
        wait_for(lambda: len(lines) >= 2, what="the first tokens")
        server.server.begin_drain()
        with server.client() as http:
            assert http.get("/ready").status_code == 503
            refused = http.post("/v1/completions", json=COMPLETION)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        thread.join(timeout=30)
        assert lines[-1] == "data: [DONE]"
        finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-1]]
        assert finish[-1] == "length" and finish.count("length") == 1
        server.thread.join(timeout=10)  # stops by itself once drained
        assert not server.thread.is_alive()


def test_drain_timeout_cuts_and_frees(llm_engine):
    free_before = llm_engine.scheduler.kv_cache_manager.num_free_blocks
    with serving(llm_engine, shutdown_timeout=1) as server:
        lines = []
        thread = start_stream(server, 600, lines)
        wait_for(lambda: len(lines) >= 2, what="the first tokens")
        started = time.monotonic()
        server.server.begin_drain()
        server.thread.join(timeout=15)
        assert not server.thread.is_alive() and time.monotonic() - started < 8
        thread.join(timeout=10)
    assert not llm_engine.has_unfinished_requests()
    assert llm_engine.scheduler.kv_cache_manager.num_free_blocks == free_before


def test_request_chat_templates_are_sandboxed_and_budgeted(llm_engine):
    settings = ServeSettings(trust_request_chat_template=True, chat_template_timeout_s=0.5)
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with serving(llm_engine, settings=settings) as server, server.client() as http:
        for template, words in [
            ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
            ("{{ cycler.__init__.__globals__.os.system('touch /tmp/kiln-pwned') }}", "unsafe"),
            ("{{ joiner.__init__.__globals__ }}", "unsafe"),
            ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "time budget"),
            ("{{ 'x' * 10**10 }}", "size limit"),
            ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "failed"),
            ("{{ raise_exception('nope') }}", "nope"),
            ("{% for", "failed"),
        ]:
            started = time.monotonic()
            response = http.post("/v1/chat/completions", json={**base, "chat_template": template})
            assert response.status_code == 400, (template, response.text)
            assert words in response.json()["error"]["message"], (template, response.text)
            assert time.monotonic() - started < 3, template
        assert not Path("/tmp/kiln-pwned").exists()
        own = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
        response = http.post("/v1/chat/completions", json={**base, "chat_template": own})
        assert response.status_code == 200
        server.wait_idle()


def test_sigterm_drains_the_real_cli(engine_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "kiln.serve", str(engine_dir), "--port", str(port),
               "--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "512",
               "--shutdown-timeout", "30", "--log-level", "warning", "--served-model-name", MODEL]
    env = {**os.environ, "KILN_API_KEY": API_KEY, "KILN_CACHE_DIR": str(tmp_path)}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=Path(__file__).resolve().parents[2])
    try:
        statuses = []

        def ready() -> bool:
            try:
                statuses.append(httpx.get(url + "/ready", headers=headers, timeout=2).status_code)
            except httpx.TransportError:
                assert process.poll() is None, log.seek(0) or log.read()
                return False
            return statuses[-1] == 200

        wait_for(ready, timeout=90, what="the server to get ready")
        assert 503 in statuses  # it listened before the model was loaded
        server = type("S", (), {"url": url, "headers": headers})
        lines = []
        thread = start_stream(server, 16, lines)
        wait_for(lambda: len(lines) >= 2, what="the first tokens")
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(url + "/v1/completions", json=COMPLETION, headers=headers, timeout=10)
        assert refused.status_code == 503
        thread.join(timeout=60)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()
