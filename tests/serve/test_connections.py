"""Connection limits that hold before authentication (issue 15, defects 1 and 9): idle,
slow and short connections closed within their deadlines, the connection cap, 300 idle
sockets under `ulimit -n 256` not locking a client out, and the 64 KiB head limit exactly.
Raw sockets on loopback, with short deadlines."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from kiln.serve.connection import ACCEPT_BACKLOG, ConnectionLimits
from tests.serve.conftest import MODEL, free_port, serving

COMPLETION = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 2}
SHORT = ConnectionLimits(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_timeout_s=0.5,
                         max_connections=8)


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes `sock` (reading what it says), at most `limit`."""
    started = time.monotonic()
    sock.settimeout(limit)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except socket.timeout:
        return float("inf"), received
    except ConnectionResetError:  # the server reset it: closed, which is what is timed
        pass
    return time.monotonic() - started, received


# ---- 1. idle and partial connections ----------------------------------------------------


@pytest.fixture(scope="module")
def short_server(llm_engine):
    with serving(llm_engine, api_key="k", limits=SHORT) as handle:
        yield handle


def test_idle_slow_and_short_connections_are_closed(short_server):
    host, port = address(short_server)
    with socket.create_connection((host, port)) as idle:  # sends nothing
        seconds, reply = closed_after(idle, 5)
        assert seconds < 2 and reply.startswith(b"HTTP/1.1 408"), (seconds, reply[:60])
    with socket.create_connection((host, port)) as slow:  # a head one byte at a time
        started = time.monotonic()
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                slow.sendall(bytes([byte]))
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):  # the server closed it: the point
            pass
        seconds, _ = closed_after(slow, 5)
        assert time.monotonic() - started < 3
    with socket.create_connection((host, port)) as short:  # a body shorter than declared
        short.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro")
        seconds, reply = closed_after(short, 5)
        assert seconds < 2, seconds
    with socket.create_connection((host, port)) as early:  # a body trickling after a 401
        early.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        try:
            while time.monotonic() - started < 5:
                early.sendall(b"a")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):  # the server closed it: the point
            pass
        assert time.monotonic() - started < 2.5, "a trickled body held the connection"
    with socket.create_connection((host, port)) as kept:  # keep-alive after an answer
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        seconds, reply = closed_after(kept, 5)
        assert reply.startswith(b"HTTP/1.1 200") and seconds < 2, (seconds, reply[:40])


def test_connection_cap_answers_503_and_frees_up(short_server):
    host, port = address(short_server)
    idle = [socket.create_connection((host, port)) for _ in range(8)]
    try:
        time.sleep(0.1)
        with socket.create_connection((host, port)) as extra:
            seconds, reply = closed_after(extra, 5)
            assert reply.startswith(b"HTTP/1.1 503") and seconds < 1, reply[:60]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(short_server.url + "/health").status_code == 200


def test_a_long_stream_is_not_cut_by_the_read_deadlines(short_server):
    body = {**COMPLETION, "max_tokens": 40, "ignore_eos": True, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", short_server.url + "/v1/completions", json=body,
                      headers={"Authorization": "Bearer k"}, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 41
    assert time.monotonic() - started > SHORT.header_timeout_s  # it outlived every deadline
    short_server.wait_idle()


SERVER_SCRIPT = """
import resource, sys, threading
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from kiln.serve.app import create_app
from kiln.serve.connection import ConnectionLimits, default_max_connections
from kiln.serve.server import make_server
never = threading.Event()
app = create_app(None, "m", engine_loader=lambda: never.wait())  # /health needs no model
limits = ConnectionLimits(header_timeout_s=1.0, max_connections=default_max_connections())
print(limits.max_connections, flush=True)
make_server(app, port=int(sys.argv[1]), log_level="error", limits=limits).run()
"""


def test_300_idle_sockets_under_ulimit_256_do_not_lock_out_a_canary(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sockets = []
    try:
        cap = int(process.stdout.readline())
        assert 8 <= cap <= 256 - 3 * ACCEPT_BACKLOG
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        for _ in range(300):
            sockets.append(socket.create_connection(("127.0.0.1", port)))
        attacked = time.monotonic()
        answered = None
        while answered is None and time.monotonic() - attacked < 10:
            try:
                canary = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if canary.status_code == 200:
                    answered = time.monotonic() - attacked
            except httpx.TransportError:  # refused or cut while the sockets pile up: retry
                pass
            time.sleep(0.05)
        assert answered is not None, "the idle sockets locked the canary out"
        print(f"\n300 idle sockets, ulimit -n 256 (cap {cap}): canary answered after {answered:.2f} s")
        assert answered < 3
        assert process.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        process.kill()
        _, err = process.communicate(timeout=10)
    assert "Too many open files" not in err, err[-2000:]


# ---- 9. the documented header limit, exactly ---------------------------------------------


def raw_head(total: int) -> bytes:
    start = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (total - len(start) - len(end)) + end


def test_header_limit_is_exact(short_server):
    host, port = address(short_server)
    limit = SHORT.max_header_bytes
    assert limit == 64 * 1024
    for total, status in ((limit, b"200"), (limit + 1, b"431"), (70_000, b"431"), (100_000, b"431")):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(raw_head(total))
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 " + status), (total, reply[:60])
            if status == b"431":
                assert b"65536 bytes" in reply


