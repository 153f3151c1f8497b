"""Triton kernels against their torch references, through Triton's CPU interpreter.

The interpreter is chosen by TRITON_INTERPRET=1, and only if it is set before triton is first
imported (triton decorates its own tl.sum, tl.max, ... at import time). Setting it here covers
`pytest tests/kernels` (pytest loads the conftests of the paths it is given first). A whole-
suite run imports kiln, and with it triton, while collecting tests/compiler and tests/checkpoint,
before this file loads: tests/conftest.py must set it too. On a CUDA machine neither sets it
and these same tests run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    from kiln.kernels.triton_utils import interpreter_active

    if interpreter_active():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.fail(
        "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on "
        "this CPU-only machine: tests/conftest.py must set it (see tests/kernels/conftest.py)"
    )


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every floating tensor a launcher allocates with torch.empty starts as NaN, so an element
    the kernel forgets to write fails the comparison instead of passing on leftover memory."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_empty)
