"""`--quant-lm-head` on the GPU: an fp8 engine whose LM head is quantised too runs with CUDA
graphs (the head's logits copied into the graphs' shared buffer) and gives the tokens of its
eager run; the head's logits stay close to the dequantised matrix's."""

from __future__ import annotations

import pytest
import torch

from kiln.compiler.builder import build_engine
from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.kernels.quant_linear import quantize_fp8_per_token_reference
from kiln.layers.embedding import QuantizedLMHead
from tests.gpu.test_model_gpu import CONFIGS, greedy_run, make_engine, prompts_for
from tests.helpers import save_tiny_hf_model


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fp8-head")
    save_tiny_hf_model(CONFIGS["llama-gqa"], directory / "hf")
    build_engine(directory / "hf", directory / "engine",
                 BuildConfig(dtype="bfloat16", quant="fp8", quant_lm_head=True), progress=False)
    return directory / "engine"


def test_graphs_give_the_eager_tokens(engine_dir):
    prompts = prompts_for(8, 512)
    with make_engine(engine_dir, enable_cuda_graphs=False) as eager_engine:
        eager = greedy_run(eager_engine, prompts, 32)
    with make_engine(engine_dir) as graphed_engine:
        assert isinstance(graphed_engine.runner.model.lm_head, QuantizedLMHead)
        assert graphed_engine.runner.graphs is not None
        assert greedy_run(graphed_engine, prompts, 32) == eager


@torch.no_grad()
def test_head_logits_match_the_dequantised_matrix(engine_dir):
    model = load_engine_model(open_engine(engine_dir), dtype=torch.bfloat16, device="cuda")
    head = model.lm_head
    weight = head.weight.float() * head.weight_scale[:, None]  # E4M3 × per-row scale
    hidden = torch.randn(5, weight.shape[1], device="cuda", dtype=torch.bfloat16)
    q, scale = quantize_fp8_per_token_reference(hidden)  # W8A8: activations per token too
    expected = (q.float() * scale) @ weight.t()
    logits = model.compute_logits(hidden)
    assert ((logits - expected).norm() / expected.norm()).item() < 1e-2
    out = torch.empty(5, head.vocab_size, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(model.compute_logits_into(hidden, out).float(), logits.to(torch.bfloat16).float())
