"""Several nodes: two `torchrun --nnodes 2 --nproc-per-node 1` launches on localhost, meeting
at a c10d rendezvous, run a tp 2 engine (rank 0 the engine, rank 1 a worker) and generate
the same greedy tokens as tp 1 in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig
from tests.helpers import save_tiny_hf_model, tiny_llama_config

SCRIPT = Path(__file__).with_name("torchrun_script.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tokens(stdout: str) -> list:
    lines = [line for line in stdout.splitlines() if line.startswith("TOKENS ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0].removeprefix("TOKENS "))


def test_two_torchrun_nodes_match_one_process(tmp_path):
    save_tiny_hf_model(tiny_llama_config(num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=96), tmp_path / "hf")
    for tp in (1, 2):
        build_engine(tmp_path / "hf", tmp_path / f"tp{tp}", BuildConfig(dtype="float32"),
                     progress=False, tp=tp)
    single = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "tp1"), "1"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    expected = _tokens(single.stdout)

    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
             "--rdzv-id", "kiln-test", "--max-restarts", "0",
             str(SCRIPT), str(tmp_path / "tp2"), "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(2)
    ]
    results = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=300)
            results.append((node.returncode, stdout, stderr))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    printed = [stdout for _, stdout, _ in results if "TOKENS " in stdout]
    assert len(printed) == 1  # only rank 0 is the engine
    assert _tokens(printed[0]) == expected


@pytest.mark.slow_parallel
def test_kiln_serve_under_torchrun(tmp_path):
    """Rank 0 serves HTTP, rank 1 runs its slice; SIGTERM ends both launches."""
    import signal
    import time

    import httpx

    save_tiny_hf_model(tiny_llama_config(num_attention_heads=4, num_key_value_heads=2),
                       tmp_path / "hf")
    build_engine(tmp_path / "hf", tmp_path / "tp2", BuildConfig(dtype="float32"),
                 progress=False, tp=2)
    port, endpoint = _free_port(), f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
             "--rdzv-id", "kiln-serve-test", "--max-restarts", "0", "-m", "kiln.cli", "serve",
             str(tmp_path / "tp2"), "--device", "cpu", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(2)
    ]
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:  # not listening yet: poll until the deadline
                pass
            time.sleep(1)
        # The server names a model by its directory's name, never its path (RELIABILITY.md).
        body = {"model": "tp2", "prompt": [1, 2, 3, 4], "max_tokens": 8,
                "temperature": 0, "ignore_eos": True}
        response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 8
        # SIGTERM to both launches (their agents pass it on): every process ends.
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            node.wait(timeout=60)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
