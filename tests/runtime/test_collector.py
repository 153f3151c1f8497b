"""The engine process's collector settings (kiln/runtime/collector.py): thresholds raised and
the start-up heap frozen on a GPU engine, both undone by close(); KILN_GC_THRESHOLD's
override and its error."""

from __future__ import annotations

import gc

import pytest
import torch

from kiln.config import EngineConfig
from kiln.runtime import collector
from kiln.runtime.engine import LLMEngine
from tests.helpers import build_tiny_engine


@pytest.fixture(scope="module")
def tiny_engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture
def python_gc():
    """Whatever a test does to the collector, the next one starts from the same settings."""
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_thresholds_from_the_environment(monkeypatch):
    monkeypatch.delenv(collector.THRESHOLD_ENV, raising=False)
    assert collector.engine_thresholds() == collector.ENGINE_THRESHOLDS
    monkeypatch.setenv(collector.THRESHOLD_ENV, " 5000, 20 ,30 ")
    assert collector.engine_thresholds() == (5000, 20, 30)
    monkeypatch.setenv(collector.THRESHOLD_ENV, "python")
    assert collector.engine_thresholds() is None
    for bad in ("20000,50", "a,b,c", "-1,10,10", "1e4,10,10", "on"):
        monkeypatch.setenv(collector.THRESHOLD_ENV, bad)
        with pytest.raises(ValueError, match="KILN_GC_THRESHOLD must be three whole numbers"):
            collector.engine_thresholds()


def test_tune_and_restore(monkeypatch, python_gc):
    monkeypatch.delenv(collector.THRESHOLD_ENV, raising=False)
    gc.set_threshold(700, 10, 10)
    previous = collector.tune_for_engine()
    assert previous == (700, 10, 10)
    assert gc.get_threshold() == collector.ENGINE_THRESHOLDS and gc.get_freeze_count() > 0
    collector.restore(previous)
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
    monkeypatch.setenv(collector.THRESHOLD_ENV, "python")  # frozen, thresholds untouched
    previous = collector.tune_for_engine()
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() > 0
    collector.restore(previous)


def test_a_gpu_engine_tunes_the_collector_and_close_undoes_it(tiny_engine_dir, monkeypatch,
                                                               python_gc):
    """from_engine_dir on CUDA (the device stood in by the CPU engine it builds): thresholds
    raised and the start-up heap frozen; close() gives both back. A malformed override fails
    the start on every device, naming the variable."""
    monkeypatch.delenv(collector.THRESHOLD_ENV, raising=False)
    gc.set_threshold(700, 10, 10)
    real_init = LLMEngine.__init__

    def as_if_on_cuda(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.device = torch.device("cuda")  # only read by from_engine_dir's check below

    config = EngineConfig(device="cpu", num_kv_blocks=64, block_size=4)
    monkeypatch.setattr(LLMEngine, "__init__", as_if_on_cuda)
    engine = LLMEngine.from_engine_dir(tiny_engine_dir, config)
    assert gc.get_threshold() == collector.ENGINE_THRESHOLDS and gc.get_freeze_count() > 0
    engine.device = torch.device("cpu")  # close() frees device memory by its type
    engine.close()
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
    monkeypatch.undo()
    monkeypatch.setenv(collector.THRESHOLD_ENV, "lots")
    with pytest.raises(ValueError, match="KILN_GC_THRESHOLD"):
        LLMEngine.from_engine_dir(tiny_engine_dir, config)
