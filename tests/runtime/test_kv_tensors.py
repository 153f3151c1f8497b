"""The KV tensors are allocated uninitialised (50+ GB is never memset at start): only the null
block is zeroed. Poisoning every other block with NaN must change nothing, whatever the mix of
prefill chunks, prefix reuse and preemption: no position is read before it is written.

Their dtype is a setting of its own (kv_cache_dtype), by default the compute dtype."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.config import EngineConfig, validated
from kiln.errors import KilnError
from kiln.parallel.state import ParallelState
from kiln.runtime.kv_tensors import NULL_BLOCK, KVCacheSpec, allocate_kv_caches
from kiln.runtime.memory_profile import cpu_kv_blocks
from kiln.runtime.sampling_params import SamplingParams
from tests.helpers import build_tiny_engine, make_cpu_engine, run_to_completion

VOCAB = 128


def test_allocation_shapes_and_null_block(monkeypatch):
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    # Hand out NaN-filled memory, as a reused GPU allocation may hold anything.
    real_empty = torch.empty

    def dirty_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(math.nan)

    monkeypatch.setattr(torch, "empty", dirty_empty)
    caches = allocate_kv_caches(spec, num_blocks=6, block_size=4)
    monkeypatch.undo()
    assert len(caches) == 3
    for cache in caches:
        assert cache.shape == (2, 6, 4, 2, 16)
        assert torch.equal(cache[:, NULL_BLOCK], torch.zeros(2, 4, 2, 16))
        assert cache[:, 1:].isnan().all()  # not memset: left as allocated
    assert spec.bytes_per_block(4) == caches[0][:, 0].numel() * 4 * 3


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("kv"), hidden_size=64,
                             intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB)


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_unwritten_kv_is_never_read(engine_dir):
    generator = torch.Generator().manual_seed(5)
    shared = torch.randint(0, VOCAB, (12,), generator=generator).tolist()  # prefix reuse
    prompts = [
        shared + torch.randint(0, VOCAB, (int(n),), generator=generator).tolist()
        for n in torch.randint(1, 20, (24,), generator=generator)
    ]
    # A small token budget (chunked prefill) and 24 usable blocks for 24 requests of up to
    # 10 blocks each: preemption and recomputation.
    knobs = dict(max_num_batched_tokens=32, num_kv_blocks=25, max_num_seqs=16)
    clean = make_cpu_engine(engine_dir, **knobs)
    for cache in clean.runner.kv_caches:
        cache.zero_()
    poisoned = make_cpu_engine(engine_dir, **knobs)
    for cache in poisoned.runner.kv_caches:
        cache[:, NULL_BLOCK + 1 :].fill_(math.nan)
    poisoned_outputs = run_to_completion(poisoned, prompts, [GREEDY] * len(prompts))
    assert sum(m.num_preemptions for o in poisoned_outputs for m in o.metrics) > 0
    clean_outputs = run_to_completion(clean, prompts, [GREEDY] * len(prompts))
    assert [o.outputs[0].token_ids for o in poisoned_outputs] == [
        o.outputs[0].token_ids for o in clean_outputs
    ]


def test_kv_cache_dtype_is_its_own_setting(engine_dir):
    """bfloat16 KV under float32 compute: half the bytes a block, the same model within
    bf16 rounding of K and V (8 mantissa bits: logprobs agree to ~1e-2)."""
    default = make_cpu_engine(engine_dir, num_kv_blocks=40)
    assert default.kv_cache_dtype == default.dtype == torch.float32  # auto: the compute dtype
    half = make_cpu_engine(engine_dir, num_kv_blocks=40, kv_cache_dtype="bfloat16")
    assert half.dtype == torch.float32
    assert all(cache.dtype == torch.bfloat16 for cache in half.runner.kv_caches)
    # The shape comes from the loaded model's attention layers (a rank's own KV heads).
    assert half.runner.kv_cache_spec == KVCacheSpec(2, 2, 16, torch.bfloat16)
    assert 2 * half.startup.kv_cache_bytes == default.startup.kv_cache_bytes
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], list(range(1, 20))]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)] * 2
    for got, want in zip(run_to_completion(half, prompts, params),
                         run_to_completion(default, prompts, params)):
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert a.top[0][1] == pytest.approx(b.top[0][1], abs=2e-2)


def test_a_bad_kv_cache_dtype_names_the_field():
    with pytest.raises(KilnError, match="kv_cache_dtype"):
        validated(EngineConfig, kv_cache_dtype="int3")


def test_cpu_kv_cache_sizing():
    assert cpu_kv_blocks(budget_bytes=10_000, bytes_per_block=1_000, max_blocks=100) == 10
    assert cpu_kv_blocks(budget_bytes=10_000, bytes_per_block=1_000, max_blocks=4) == 4
    with pytest.raises(KilnError, match="cpu_kv_cache_bytes 1500 holds fewer than 2 KV blocks"):
        cpu_kv_blocks(budget_bytes=1_500, bytes_per_block=1_000, max_blocks=100)


def _attention_layers(count: int, num_kv_heads: int, head_dim: int = 4) -> torch.nn.Module:
    from kiln.layers.attention import Attention

    return torch.nn.ModuleList(Attention(8, head_dim, num_kv_heads, 0.5) for _ in range(count))


def test_key_offsets_go_to_each_rank_s_kv_heads():
    from kiln.runtime.kv_tensors import FP8_KV_DTYPE, apply_kv_scales

    # 2 layers x 4 KV heads x 4 channels, each entry naming its (layer, head, channel).
    offsets = [[[100 * layer + 10 * head + channel for channel in range(4)] for head in range(4)]
               for layer in range(2)]
    build = {"kv_scales": {"k": [0.5, 0.25], "v": [1.0, 2.0], "calibrated": True,
                           "k_offset": offsets}}
    recorded = torch.tensor(offsets, dtype=torch.float32)
    single = _attention_layers(2, 4)
    apply_kv_scales(single, build, FP8_KV_DTYPE)
    assert [float(layer.k_scale) for layer in single] == [0.5, 0.25]
    assert all(torch.equal(layer.k_offset, recorded[i]) for i, layer in enumerate(single))
    # tp 2: two KV heads a rank; tp 8: each KV head on two ranks.
    for tp_size, local in ((2, 2), (8, 1)):
        for rank in range(tp_size):
            layers = _attention_layers(2, local)
            apply_kv_scales(layers, build, FP8_KV_DTYPE, ParallelState.for_slicing(tp_size, 1, rank))
            first = rank * local // max(1, tp_size // 4)
            for index, layer in enumerate(layers):
                assert torch.equal(layer.k_offset, recorded[index, first : first + local])
    # pp 2: each stage holds one of the two layers, and takes that layer's scales and offsets
    # (the lists are indexed by the full model's layers).
    for stage in range(2):
        layers = _attention_layers(1, 4)
        apply_kv_scales(layers, build, FP8_KV_DTYPE, ParallelState.for_slicing(1, 2, stage))
        assert float(layers[0].k_scale) == [0.5, 0.25][stage]
        assert float(layers[0].v_scale) == [1.0, 2.0][stage]
        assert torch.equal(layers[0].k_offset, recorded[stage])
    # A bf16 cache takes no offsets; an engine without them keeps zeros.
    layers = _attention_layers(2, 4)
    apply_kv_scales(layers, build, torch.bfloat16)
    assert all(not layer.k_offset.any() for layer in layers)
    apply_kv_scales(layers, {"kv_scales": {**build["kv_scales"], "k_offset": None}}, FP8_KV_DTYPE)
    assert all(not layer.k_offset.any() for layer in layers)


def test_kv_scales_that_fit_no_layer_are_one_line():
    from kiln.runtime.kv_tensors import FP8_KV_DTYPE, apply_kv_scales

    build = {"kv_scales": {"k": [0.5], "v": [1.0], "calibrated": True}}
    with pytest.raises(ValueError, match="kv_scales hold 1 k and 1 v scales; this model's "
                                         "layers 0..1 need them"):
        apply_kv_scales(_attention_layers(2, 4), build, FP8_KV_DTYPE)
    # More scales than layers in one process is as wrong as fewer (not the first ones used).
    build = {"kv_scales": {"k": [0.5, 0.25, 0.1], "v": [1.0, 2.0, 3.0], "calibrated": True}}
    with pytest.raises(ValueError, match="kv_scales hold 3 k and 3 v scales"):
        apply_kv_scales(_attention_layers(2, 4), build, FP8_KV_DTYPE)


@pytest.mark.parametrize("bad", [[[[1.0] * 4] * 4], [[[1.0] * 3] * 4] * 2, [[["x"] * 4] * 4] * 2])
def test_a_key_offset_that_fits_no_layer_is_one_line(bad):
    from kiln.runtime.kv_tensors import FP8_KV_DTYPE, apply_kv_scales

    build = {"kv_scales": {"k": [0.5, 0.25], "v": [1.0, 2.0], "calibrated": True,
                           "k_offset": bad}}
    with pytest.raises(ValueError, match="the manifest's kv_scales.k_offset"):
        apply_kv_scales(_attention_layers(2, 4), build, FP8_KV_DTYPE)
