"""The GPU-only kernels compile for sm_90 on this (GPU-less) machine, and lower as designed:
int_gemv converts no integer weight (its point), and the skinny FP8 GEMM runs on wgmma with
E4M3 operands and its "serial" split-K with a gpu-scope fence and an atomic counter, the
skinny int4 GEMM on bf16/fp16 wgmma after LOP3 unpacking (no integer conversions; its Gluon
twin with no shared-memory round trip for the weights), and the
decode attention on an FP8 cache (V dims-major, attention.value_view) widens K and V from
two-byte pairs (no byte loads from shared memory), or in E4M3 dots runs on E4M3 wgmma with
no K or V element converted. The interpreter runs these kernels' Python, not Triton's compiler, so a compile error that only
the GPU would raise is caught here (tests/kernels/sm90_lowering.py does the compiling, in a
process without TRITON_INTERPRET)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_lowering.py")


@pytest.fixture(scope="module")
def lowering() -> dict:
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its CUDA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _skip_without_gluon() -> None:
    """The Gluon twins compiled to nothing: allowed only on a Triton before 3.5 (pyproject
    accepts triton>=3.2; there the Triton kernels run instead). From 3.5 on, as in CI's pinned
    3.6, a missing Gluon is a failure, not a skip."""
    import triton

    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    assert (major, minor) < (3, 5), f"triton {triton.__version__} should have Gluon"
    pytest.skip(f"triton {triton.__version__} has no Gluon (3.5+): the Triton kernels run")


def test_int_gemv_compiles_for_sm90_without_weight_conversions(lowering):
    """And the packed int4 variant's assembly (two bf16 weights an instruction) and the FP8
    one (E4M3 pairs to float16) assemble for sm_90 (ptxas runs in the compile), with K split
    too: a PTX typo or a split-only compile error fails here, not on the device."""
    for name, found in lowering["int_gemv"].items():
        assert found == {"conversions_from_int": 0, "griddepcontrol": True,
                         "packed_bf16_fma": name.startswith("int4_packed"),
                         "e4m3_pairs_to_f16": name == "fp8"}, name


def test_skinny_fp8_lowers_to_wgmma_and_serial_split_k_to_fence_and_atomic(lowering):
    modes = lowering["skinny_fp8"]
    assert all(found["wgmma_e4m3"] for found in modes.values())
    assert modes["serial"]["atomic"] and modes["serial"]["fence"]
    assert not modes["reduce"]["atomic"] and not modes["unsplit"]["fence"]


def test_skinny_int8_converts_weights_by_bit_operations_into_bf16_wgmma(lowering):
    for name, found in lowering["skinny_int8"].items():
        assert found["wgmma_bf16"] and found["weight_copies"] > 0, name
        assert found["int_conversions"] == 0 and not found["local_memory"], name


def test_int_gemm_runs_128_token_bf16_wgmma_without_conversions(lowering):
    for name, found in lowering["int_gemm"].items():
        assert found["wgmma_bf16"] and found["weight_copies"] > 0, name
        assert found["int_conversions"] == 0 and not found["local_memory"], name


def test_skinny_int4_lowers_to_wgmma_with_lop3_unpacking(lowering):
    for name, found in lowering["skinny_int4"].items():
        assert found["wgmma"] and found["griddepcontrol"], name
        assert found["conversions_from_int"] == 0, name
        # The inline assembly, once in the PTX per unrolled sub-tile: 4 LOP3 and 4 packed
        # FMAs a word
        assert found["nibble_lop3"] >= 4 and found["packed_fma"] >= 4, name


def test_skinny_int4_gluon_unpacks_into_the_wgmma_operand(lowering):
    if not lowering["skinny_int4_gluon"]:
        _skip_without_gluon()
    for name, found in lowering["skinny_int4_gluon"].items():
        assert found["wgmma"] and found["nibble_lop3"] >= 4, name
        assert found["pdl_weights_before_x"] and found["launch_dependents"], name
        # x in 16-byte runs, permuted in registers: no two-byte gathers
        assert found["x_two_byte_loads"] == 0 and found["x_wide_loads"] >= 1, name
        # unpacked weights never pass through shared memory
        assert found["weight_ldmatrix"] == 0, name
        if found["stages"] == 0:  # 16 bytes of a row a thread, straight into registers
            assert found["wide_weight_loads"] >= 1, name
        else:  # through the ring: 16-byte copies in, the fragment's 16 bytes a row read out
            assert found["wide_async_copies"] >= 2 and found["wide_shared_reads"] >= 2, name


def test_skinny_int8_gluon_converts_into_the_wgmma_operand(lowering):
    if not lowering["skinny_int8_gluon"]:
        _skip_without_gluon()
    for name, found in lowering["skinny_int8_gluon"].items():
        assert found["wgmma"] and found["launch_dependents"], name
        # weights (two 16-byte loads a row a step) and x (16-byte runs)
        assert found["wide_loads"] >= 3 and found["x_two_byte_loads"] == 0, name
        assert found["int_conversions"] == 0 and found["shared_reads"] == 0, name
        # a thread's two rows' scale (after the loop, or in it if grouped; never one a word:
        # 16) and, unsplit, its two rows' bias
        assert found["scale_loads"] == 2 + 2 * ("unsplit" in name), name


def test_fp8_decode_widens_k_and_v_from_byte_pairs(lowering):
    found = lowering["fp8_decode"]
    assert found["byte_loads_from_shared"] == 0
    # One conversion per two E4M3 values of K and of V (64 keys x 128 dims each, 128 threads)
    assert found["pair_conversions"] >= 2 * 64 * 128 // 2 // 128
    assert found["async_copies"] > 0  # V's keys vectorise (V_RUN): copied like K's dims


def test_fp8_decode_in_e4m3_dots_runs_on_e4m3_wgmma_without_conversions(lowering):
    found = lowering["fp8_decode"]
    assert found["e4m3_wgmma"]
    # Only the query's split (its first E4M3 rounding widened once, outside the key loop:
    # 128 dims x 16 heads, 128 threads, two a conversion); a tile's K or V would be 64 more.
    assert found["e4m3_conversions"] <= 128 * 16 // (128 * 2)
    assert found["e4m3_async_copies"] > 0
