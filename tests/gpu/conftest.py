"""tests/gpu: tests that need a CUDA GPU. Every test here is marked `gpu` and, where CUDA is
absent, skipped with the reason shown in the summary (never reported as passed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees the whole session's items: touch only those under tests/gpu.
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tests/gpu runs on the GPU machine)")
    for item in items:
        if _HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
