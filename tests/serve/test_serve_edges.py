"""The server's life at its edges (issue 15, defects 6, 7, 8, 10 and 11): streams cut by the
shutdown timeout end as OpenAI streams do, a request larger than the queue is a 400, a model
that fails to load stops `kiln serve` (one line, non-zero), no key off loopback is refused,
and no path of the machine reaches a client."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from kiln.errors import KilnError
from kiln.serve.state import ServeSettings
from tests.serve.conftest import MODEL, free_port, serving

COMPLETION = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 2}


# ---- 7. streams cut by the shutdown timeout ---------------------------------------------


def test_streams_cut_by_the_shutdown_timeout_end_with_an_error_and_done(llm_engine, capfd):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "kiln", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with serving(llm_engine, shutdown_timeout=1) as server:
            lines: list[str] = []

            def stream() -> None:
                body = {**COMPLETION, "max_tokens": 600, "ignore_eos": True, "stream": True}
                with httpx.stream("POST", server.url + "/v1/completions", json=body,
                                  headers=server.headers, timeout=60) as response:
                    lines.extend(line for line in response.iter_lines() if line)

            streams = [threading.Thread(target=stream) for _ in range(2)]
            for thread in streams:
                thread.start()
            deadline = time.monotonic() + 30
            while server.state.in_flight < 2 or server.engine.scheduler.num_running < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.3)
            server.server.begin_drain()
            for thread in streams:
                thread.join(timeout=30)
            server.thread.join(timeout=15)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert lines.count("data: [DONE]") == 2
    errors = [json.loads(line[6:])["error"] for line in lines if line.startswith('data: {"error"')]
    assert len(errors) == 2
    for error in errors:
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "server_shutdown" and "shut down" in error["message"]
    text = capfd.readouterr().err + "\n".join(r.getMessage() for r in records)
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
    assert not any(r.exc_info for r in records)
    assert any("cut 2 requests" in r.getMessage() for r in records)
    assert not llm_engine.has_unfinished_requests()


# ---- 8. requests that can never be served ------------------------------------------------


def test_a_request_larger_than_the_queue_is_400_not_503(llm_engine):
    with serving(llm_engine, settings=ServeSettings(max_queued_requests=8)) as server, \
            server.client() as http:
        for body in ({**COMPLETION, "n": 9}, {**COMPLETION, "prompt": ["a", "b"], "n": 5}):
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 400, response.text
            assert "retry-after" not in response.headers
            assert "at most 8" in response.json()["error"]["message"]
        chat = http.post("/v1/chat/completions", json={
            "model": MODEL, "n": 9, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "--max-queued-requests" in chat.json()["error"]["message"]
        assert http.post("/v1/completions", json={**COMPLETION, "n": 8}).status_code == 200
        server.wait_idle()


def test_load_errors_do_not_show_paths_to_clients(llm_engine):
    def loader():
        raise KilnError("/home/secret/.cache/kiln/engines/abc/engine.json: corrupt manifest")

    with serving(None, engine_loader=loader) as server, server.client() as http:
        deadline = time.monotonic() + 10
        while server.state.load_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for response in (http.get("/ready"), http.post("/v1/completions", json=COMPLETION),
                         http.get("/v1/models")):
            assert "/home/secret" not in response.text, response.text
        assert "failed to load" in http.get("/ready").json()["error"]["message"]


# ---- 6 and 10: `kiln serve` refuses to start open, and stops when the model cannot load ----


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KILN_API_KEY"}
    return subprocess.run([sys.executable, "-m", "kiln.serve", *args], env=env, text=True,
                          capture_output=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])


def test_no_key_off_loopback_and_an_empty_key_are_refused():
    for args, words in (
        (["--host", "0.0.0.0"], "--allow-unauthenticated"),
        (["--host", "192.0.2.1"], "without an API key"),
        (["--api-key", ""], "--api-key is empty"),
    ):
        started = time.monotonic()
        result = run_serve("/nonexistent/engine", "--port", str(free_port()), *args, timeout=60)
        assert result.returncode == 1, (args, result.stderr[-500:])
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert time.monotonic() - started < 30


def test_a_model_that_fails_to_load_stops_the_server(engine_dir, tmp_path):
    broken = tmp_path / "broken-engine"
    broken.mkdir()
    for path in engine_dir.iterdir():  # links, so the test copies no weights
        (broken / path.name).symlink_to(path)
    manifest = json.loads((engine_dir / "engine.json").read_text())
    manifest["files"]["rank0.safetensors"]["bytes"] += 1
    (broken / "engine.json").unlink()
    (broken / "engine.json").write_text(json.dumps(manifest))
    common = [str(broken), "--device", "cpu", "--num-kv-blocks", "32", "--max-model-len", "256"]
    result = run_serve(*common, "--port", str(free_port()))
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln: error: the model failed to load:") and "rank0.safetensors" in last
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    # Asked to stay up, it answers /health 503 instead.
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KILN_API_KEY"}
    process = subprocess.Popen([sys.executable, "-m", "kiln.serve", *common, "--port", str(port),
                                "--stay-up-on-error"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if health.status_code == 503:
                    break
            except httpx.TransportError:  # not listening yet: poll until the deadline
                pass
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert health.json() == {"status": "dead"}
    finally:
        process.kill()
        process.wait(timeout=10)


def test_served_model_name_is_never_a_path():
    from kiln.serve.cli import served_model_name

    def name(model: str, flag: str | None = None) -> str:
        return served_model_name(argparse.Namespace(model=model, served_model_name=flag))

    assert name("smollm2") == "smollm2"
    assert name("/home/me/.cache/kiln/engines/SmolLM2-135M-Instruct-abc123/") == "SmolLM2-135M-Instruct-abc123"
    assert name("/models/llama.Q4_K_M.gguf") == "llama.Q4_K_M"
    assert name("/models/x", "my-model") == "my-model"


def test_hostile_request_templates_get_a_fast_400(llm_engine):
    from tests.serve.test_chat_template_limits import HOSTILE

    settings = ServeSettings(trust_request_chat_template=True, chat_template_timeout_s=0.5)
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with serving(llm_engine, settings=settings) as server, server.client() as http:
        for name, template in HOSTILE:
            started = time.monotonic()
            response = http.post("/v1/chat/completions", json={**base, "chat_template": template})
            assert response.status_code == 400, (name, response.text)
            assert time.monotonic() - started < 2, name
        assert http.post("/v1/completions", json=COMPLETION).status_code == 200
        server.wait_idle()
