"""KILN_BATCH_INVARIANT=1 on the GPU: a row's result does not depend on the other rows of its
step (linears at real shapes for 1..16 rows, decode attention alone or among others), and so
greedy speculative decoding in bf16 gives exactly the tokens of plain decoding — which the
default kernels do not promise: a batch-1 GEMV and a 5-row GEMM sum in different orders."""

from __future__ import annotations

import pytest
import torch

from kiln.config import EngineConfig
from kiln.kernels import attention, ops
from kiln.runtime.engine import LLMEngine
from tests.gpu.test_spec_gpu import build_tiny_engine, plain_run
from tests.helpers import run_to_completion
from tests.kernels.kernel_helpers import make_paged_batch


@pytest.fixture
def invariant(monkeypatch):
    monkeypatch.setenv("KILN_BATCH_INVARIANT", "1")


@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 14336), (128256, 4096)])
def test_linear_rows_do_not_depend_on_the_row_count(invariant, shape):
    generator = torch.Generator(device="cuda").manual_seed(shape[0])
    n, k = shape
    weight = (torch.randn(n, k, generator=generator, device="cuda") * k**-0.5).bfloat16()
    x = torch.randn(16, k, generator=generator, device="cuda").bfloat16()
    alone = torch.cat([ops.linear(x[i : i + 1], weight, None) for i in range(16)])
    for m in (2, 5, 8, 16):
        assert torch.equal(ops.linear(x[:m], weight, None), alone[:m]), m
    expected = (x.float() @ weight.float().T).bfloat16()
    torch.testing.assert_close(alone, expected, rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 14336)])
def test_quantised_linear_rows_do_not_depend_on_the_row_count(invariant, scheme, shape):
    """The quantised decode linears too (kernels/ops.py _weight_only_batch_invariant; fp8's
    skinny GEMM keeps 16 token columns whatever the rows): one row alone gives the bits it
    gets among 2, 5, 8 or 16."""
    from kiln.quant.quantize import quantize_fp8_per_channel, quantize_int4, quantize_int8

    generator = torch.Generator(device="cuda").manual_seed(shape[0] + len(scheme))
    n, k = shape
    weight = torch.randn(n, k, generator=generator, device="cuda") * k**-0.5
    x = torch.randn(16, k, generator=generator, device="cuda").bfloat16()
    if scheme == "fp8":
        tensors = quantize_fp8_per_channel(weight)

        def linear(rows):
            return ops.fp8_linear(rows, *tensors, None, None)
    elif scheme == "int8":
        tensors = quantize_int8(weight, k)

        def linear(rows):
            return ops.int8_weight_only_linear(rows, *tensors, None)
    else:
        tensors = quantize_int4(weight, 128)

        def linear(rows):
            return ops.int4_weight_only_linear(rows, *tensors, None, integer_zeros=True)
    alone = torch.cat([linear(x[i : i + 1]) for i in range(16)])
    for m in (2, 5, 8, 16):
        assert torch.equal(linear(x[:m]), alone[:m]), m


def test_decode_attention_alone_equals_among_others(invariant):
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    contexts = [5000, 37, 900, 130, 4096, 1, 2500, 64]
    batch = make_paged_batch([1] * 8, contexts, heads, kv_heads, head_dim, block_size,
                             torch.bfloat16, "cuda", seed=7)
    together = attention.paged_decode_attention(batch.query, batch.kv_cache, batch.block_tables,
                                                batch.seq_lens, head_dim**-0.5)
    for row in range(8):
        alone = attention.paged_decode_attention(
            batch.query[row : row + 1], batch.kv_cache, batch.block_tables[row : row + 1],
            batch.seq_lens[row : row + 1], head_dim**-0.5)
        assert torch.equal(alone[0], together[row]), row


@pytest.fixture(scope="module")
def bf16_engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("batch-invariant"), "bfloat16")


@pytest.mark.parametrize("batch", [1, 3])  # 3 x (1 + 4) = 15 rows: within the 16-row tiles
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_bf16_speculative_greedy_equals_plain(invariant, bf16_engine_dir, method, batch):
    config = EngineConfig(max_num_seqs=64, max_model_len=512, num_kv_blocks=256)
    prompts, params, expected, speculative = plain_run(bf16_engine_dir, config, method, batch)
    with LLMEngine.from_engine_dir(bf16_engine_dir, config, speculative) as engine:
        got = [o.outputs[0].token_ids for o in run_to_completion(engine, prompts, params)]
        assert engine.speculator.stats.num_verify_rows > 0
    assert got == expected
