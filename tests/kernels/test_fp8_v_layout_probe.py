"""benchmarks/fp8_v_layout_probe.py's kernel (FP8 decode over a cache whose V half is stored
dims-major) against the torch reference on the same cache in the usual layout, so the probe
the next device call times computes attention."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PROBE = Path(__file__).parents[2] / "benchmarks" / "fp8_v_layout_probe.py"


def test_v_dims_major_decode_matches_the_reference(device):
    spec = importlib.util.spec_from_file_location("fp8_v_layout_probe", PROBE)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    kv = torch.arange(2 * 3 * 4 * 2 * 8, dtype=torch.float32).view(2, 3, 4, 2, 8)
    moved = probe.to_v_dims_major(kv)
    assert torch.equal(moved[0], kv[0])  # K untouched; V block b holds (head, dim, slot)
    assert torch.equal(moved[1].reshape(3, 2, 8, 4), kv[1].permute(0, 2, 3, 1))
    # float32 dots under the interpreter; float16 ones on a GPU
    assert probe.check(device) < (1e-4 if device == "cpu" else 2e-2)
