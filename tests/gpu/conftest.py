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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Write a failure out the moment it happens, through the terminal reporter (pytest's
    # output capture does not reach it): a GPU fault later in the same process (the whole
    # directory runs as one) can abort it before pytest's summary is written.
    outcome = yield
    report = outcome.get_result()
    if report.failed and _HERE in Path(str(item.fspath)).parents:
        reporter = item.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext}")
