"""`kiln eval --path decode` on the GPU: windows fed one token a step go through the CUDA
decode kernels (split-K, an FP8 cache's float16 or E4M3 dots) and predict what the prefill
kernels predict, within each path's rounding. Importable everywhere; tests/gpu/conftest.py
skips it where CUDA is absent."""

from __future__ import annotations

import pytest
import torch

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig
from kiln.evaluate.forward import TeacherForcedModel
from kiln.evaluate.perplexity import evaluate, windows
from tests.helpers import save_tiny_hf_model, tiny_llama_config

WINDOW = 200


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # Llama-3.1-8B's head shape (head_dim 128, 4 query heads a KV head), two layers.
    directory = tmp_path_factory.mktemp("eval-decode")
    config = tiny_llama_config(hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                               num_key_value_heads=1, vocab_size=512, max_position_embeddings=512)
    save_tiny_hf_model(config, directory / "hf")
    build_engine(directory / "hf", directory / "engine", BuildConfig(dtype="bfloat16"),
                 progress=False)
    return directory / "engine"


def _tokens(count: int) -> list[int]:
    return torch.randint(0, 512, (count,), generator=torch.Generator().manual_seed(1)).tolist()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _decode_path_logits(model: TeacherForcedModel, chunks: list[list[int]]) -> list[torch.Tensor]:
    steps = list(model.decode_logits(chunks))
    return [torch.stack([step[index] for step in steps[: len(chunk) - 1]])
            for index, chunk in enumerate(chunks)]


def test_the_decode_kernels_predict_what_the_prefill_kernels_do(engine):
    chunks = windows(_tokens(700), WINDOW, 650)  # 200, 200, 200, 53: ragged
    prefill = TeacherForcedModel(engine, device="cuda", max_window=WINDOW)
    decode = TeacherForcedModel(engine, device="cuda", max_window=WINDOW, max_windows=4)
    for chunk, logits in zip(chunks, _decode_path_logits(decode, chunks)):
        assert _relative(logits, prefill.logits(chunk)[:-1]) < 0.02
    result = evaluate(decode, _tokens(700), window=WINDOW, num_tokens=650, other=prefill,
                      progress=False, path="decode")
    assert result.num_tokens == 650
    assert result.compare.top1_agreement > 0.95
    assert abs(result.compare.ppl_delta_pct) < 0.5


@pytest.mark.filterwarnings("ignore:FP8 KV cache with uncalibrated scales")
def test_an_fp8_caches_decode_dots_show_on_the_decode_path(engine, monkeypatch):
    """Both FP8 decode modes stay near the 16-bit prefill's logits; the E4M3 dots (query and
    p rounded to E4M3) differ from the float16 dots, so the path reaches the mode's kernel."""
    chunks = windows(_tokens(700), WINDOW, 650)
    reference = TeacherForcedModel(engine, device="cuda", max_window=WINDOW)
    fp8 = TeacherForcedModel(engine, device="cuda", max_window=WINDOW, max_windows=4,
                             kv_cache_dtype="fp8")
    by_mode = {}
    for mode in ("fp16", "e4m3"):
        monkeypatch.setenv("KILN_FP8_KV_DOT", mode)
        by_mode[mode] = _decode_path_logits(fp8, chunks)
    for index, chunk in enumerate(chunks):
        expected = reference.logits(chunk)[:-1]
        assert _relative(by_mode["fp16"][index], expected) < 0.05
        assert _relative(by_mode["e4m3"][index], expected) < 0.08
        assert not torch.equal(by_mode["fp16"][index], by_mode["e4m3"][index])
