"""Bad input at the edge: every case of a hostile list gets the right 4xx and a message that
says what is wrong, fast, and the server answers a normal request afterwards. Plus the size
limits (431, 413) and the key on every route."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from starlette.routing import Route

from tests.serve.conftest import MODEL

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OK_COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
BILLION = 10**9

# (name, path, JSON body or raw bytes, expected status, words the message must contain)
CASES = [
    ("empty prompt", COMPLETIONS, {**OK_COMPLETION, "prompt": ""}, 400, "empty"),
    ("empty token list", COMPLETIONS, {**OK_COMPLETION, "prompt": []}, 400, "empty"),
    ("empty batch entry", COMPLETIONS, {**OK_COMPLETION, "prompt": [[1, 2], []]}, 400, "empty"),
    ("NUL in prompt", COMPLETIONS, {**OK_COMPLETION, "prompt": "a\x00b"}, 400, "NUL"),
    ("NUL in message", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "\x00"}]}, 400, "NUL"),
    ("raw NUL byte in JSON", COMPLETIONS, b'{"prompt": "a\x00b"}', 400, "JSON"),
    ("not JSON", COMPLETIONS, b"prompt=hello", 400, "JSON"),
    ("prompt is an object", COMPLETIONS, {**OK_COMPLETION, "prompt": {"a": 1}}, 400, "prompt"),
    ("negative max_tokens", COMPLETIONS, {**OK_COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", COMPLETIONS, {**OK_COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", COMPLETIONS, {**OK_COMPLETION, "max_tokens": 10**30}, 400, "max_tokens"),
    ("max_tokens over the context", COMPLETIONS, {**OK_COMPLETION, "max_tokens": 1024}, 400,
     "maximum context length is 1024"),
    ("bool as int", COMPLETIONS, {**OK_COMPLETION, "max_tokens": True}, 400, "max_tokens"),
    ("NaN temperature", COMPLETIONS, b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', 400,
     "temperature"),
    ("infinite top_p", COMPLETIONS, b'{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}', 400, "top_p"),
    ("negative temperature", COMPLETIONS, {**OK_COMPLETION, "temperature": -0.5}, 400, "temperature"),
    ("huge temperature", COMPLETIONS, {**OK_COMPLETION, "temperature": 1e308}, 400, "temperature"),
    ("top_p zero", COMPLETIONS, {**OK_COMPLETION, "top_p": 0}, 400, "top_p"),
    ("top_k -2", COMPLETIONS, {**OK_COMPLETION, "top_k": -2}, 400, "top_k"),
    ("negative repetition penalty", COMPLETIONS, {**OK_COMPLETION, "repetition_penalty": -1}, 400,
     "repetition_penalty"),
    ("huge n", COMPLETIONS, {**OK_COMPLETION, "n": BILLION}, 400, "n"),
    ("n over the schema cap", COMPLETIONS, {**OK_COMPLETION, "n": 129}, 400, "n"),
    ("n over the server cap", COMPLETIONS, {**OK_COMPLETION, "n": 17}, 400, "n must be <= 16"),
    ("best_of != n", COMPLETIONS, {**OK_COMPLETION, "best_of": 4}, 400, "best_of"),
    ("huge logprobs", COMPLETIONS, {**OK_COMPLETION, "logprobs": BILLION}, 400, "logprobs"),
    ("logprobs cap + 1", COMPLETIONS, {**OK_COMPLETION, "logprobs": 21}, 400, "logprobs"),
    ("top_logprobs cap + 1", CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, "logprobs"),
    ("too many stop strings", COMPLETIONS, {**OK_COMPLETION, "stop": ["x"] * 17}, 400, "stop"),
    ("stop string too long", COMPLETIONS, {**OK_COMPLETION, "stop": "x" * 257}, 400, "stop"),
    ("empty stop string", COMPLETIONS, {**OK_COMPLETION, "stop": [""]}, 400, "stop"),
    ("too many stop ids", COMPLETIONS, {**OK_COMPLETION, "stop_token_ids": [1] * 1025}, 400,
     "stop_token_ids"),
    ("seed out of range", COMPLETIONS, {**OK_COMPLETION, "seed": 2**64}, 400, "seed"),
    ("min_tokens over max_tokens", COMPLETIONS, {**OK_COMPLETION, "min_tokens": 5}, 400, "min_tokens"),
    ("token id = vocab size", COMPLETIONS, {**OK_COMPLETION, "prompt": [1, 49152]}, 400, "vocabulary"),
    ("negative token id", COMPLETIONS, {**OK_COMPLETION, "prompt": [-1]}, 400, "prompt"),
    ("huge token id", COMPLETIONS, {**OK_COMPLETION, "prompt": [2**40]}, 400, "prompt"),
    ("detokenize out of vocab", "/detokenize", {"tokens": [10**6]}, 400, "vocabulary"),
    ("too many prompts", COMPLETIONS, {**OK_COMPLETION, "prompt": ["a"] * 65}, 400, "at most 64"),
    ("logit_bias", COMPLETIONS, {**OK_COMPLETION, "logit_bias": {"1": 5.0}}, 400, "logit_bias"),
    ("no messages", CHAT, {**OK_CHAT, "messages": []}, 400, "messages"),
    ("unknown role", CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("image content", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages"),
    ("tools", CHAT, {**OK_CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("request chat template (disabled)", CHAT, {**OK_CHAT, "chat_template": "{{ ''.__class__.__mro__ }}"},
     400, "disabled"),
    ("request chat template: cycler globals", CHAT,
     {**OK_CHAT, "chat_template": "{{ cycler.__init__.__globals__ }}"}, 400, "disabled"),
    ("unknown model", COMPLETIONS, {**OK_COMPLETION, "model": "gpt-9"}, 404, "does not exist"),
    ("tokenize both", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400,
     "exactly one"),
]


@pytest.mark.parametrize("name,path,body,status,words", CASES, ids=[c[0] for c in CASES])
def test_adversarial_input(server, name, path, body, status, words):
    with server.client() as http:
        started = time.monotonic()
        if isinstance(body, bytes):
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post(path, json=body)
        elapsed = time.monotonic() - started
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert words in error["message"], error["message"]
        assert elapsed < 2.0, f"rejecting took {elapsed:.2f} s"
        # The server is unharmed.
        ok = http.post(COMPLETIONS, json=OK_COMPLETION)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_ssti_in_message_content_is_just_text(server):
    payload = "{{ ''.__class__.__mro__ }} {% for x in cycler.__init__.__globals__ %}{% endfor %}"
    with server.client() as http:
        tokens = http.post("/tokenize", json={"messages": [{"role": "user", "content": payload}]}).json()
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert payload in text  # rendered as data, never evaluated
        response = http.post(CHAT, json={**OK_CHAT, "messages": [{"role": "user", "content": payload}]})
        assert response.status_code == 200


def test_huge_header_gets_431(server):
    with server.client() as http:
        response = http.get("/v1/models", headers={"X-Padding": "a" * (1 << 20)})
        assert response.status_code == 431
        assert "header" in response.json()["error"]["message"]
        assert http.get("/v1/models").status_code == 200


def test_huge_body_gets_413(server):
    with server.client() as http:
        body = b'{"prompt": "' + b"a" * (50 << 20) + b'"}'
        response = http.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert "too large" in response.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"a" * (1 << 20)
            yield b'"}'

        response = http.post(COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert http.post(COMPLETIONS, json=OK_COMPLETION).status_code == 200


def test_unknown_route_and_method_are_openai_errors(server):
    with server.client() as http:
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404 and "error" in missing.json()
        wrong = http.get(COMPLETIONS)
        assert wrong.status_code == 405 and "error" in wrong.json()


def _walk(routes):
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's wrapper of an included router
            yield from _walk(route.original_router.routes)
        elif isinstance(route, Route):
            yield route


def test_every_route_needs_the_key(server):
    app = server.server.config.app
    routes = [(route.path, method) for route in _walk(app.routes) for method in sorted(route.methods)]
    paths = {path for path, _ in routes}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
            "/ready", "/metrics", "/", "/openapi.json", "/health"} <= paths
    assert set(app.openapi()["paths"]) <= paths  # the walk saw every documented route
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Bearer"},
                    {"Authorization": "Basic !!!"}, {"Authorization": f"Token {server.api_key}"}):
        for path, method in routes:
            response = httpx.request(method, server.url + path, headers=headers, json={})
            if path == "/health":
                assert response.status_code == 200
            else:
                assert response.status_code == 401, (method, path, response.status_code)
                if method != "HEAD":
                    assert response.json()["error"]["code"] == "invalid_api_key"
    # The browser form of the key (Basic, password = key) opens the page.
    page = httpx.get(server.url + "/", auth=("user", server.api_key))
    assert page.status_code == 200 and "<title>kiln chat</title>" in page.text
    assert httpx.get(server.url + "/").headers["www-authenticate"].startswith("Basic")


def test_raw_socket_garbage_does_not_hurt(server):
    host, port = server.url.removeprefix("http://").split(":")
    for garbage in (b"\x00\xff\x00\xff\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n"
                    b"Content-Length: -5\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(garbage)
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 4"), reply[:80]
    with server.client() as http:
        assert http.post(COMPLETIONS, json=OK_COMPLETION).status_code == 200
