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
