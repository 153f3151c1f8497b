"""Compiles kernels ahead of time for sm_90 (Hopper) on a machine without a GPU and prints
what their PTX contains, as JSON: run by tests/kernels/test_sm90_lowering.py in a fresh
process (the tests run Triton's interpreter, whose kernels cannot be compiled).

A GPU-only compile error (one the interpreter does not raise: Triton traces the code after a
`return` inside a constexpr `if`, for instance) then fails on the CPU, not on the device."""

from __future__ import annotations

import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.kernels.attention import (E4M3_P_SCALE, MIN_DECODE_SPLIT_TOKENS,
                                    _paged_decode_e4m3_kernel, _paged_decode_kernel)
from kiln.kernels.int_gemv import _int_gemv_kernel
from kiln.kernels.skinny_fp8 import _skinny_fp8_kernel
from kiln.kernels.skinny_int4 import _skinny_int4_kernel

TARGET = GPUTarget("cuda", 90, 32)
ALIGNED = [["tt.divisibility", 16]]


def compile_ptx(kernel, signature: dict, constants: dict, num_warps: int = 4) -> str:
    """PTX of `kernel` for sm_90; pointers and integer arguments marked 16-aligned as a launch
    on real tensors would specialise them."""
    # Keyed by argument index: Triton 3.6 ignores attributes keyed by name.
    attrs = {(kernel.arg_names.index(name),): ALIGNED for name, kind in signature.items()
             if kind != "constexpr" and not kind.startswith("fp")}
    signature = {**signature, **{name: "constexpr" for name in constants}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps}).asm["ptx"]


def compile_gluon_ptx(kernel, signature: dict, constants: dict) -> str:
    """compile_ptx for a Gluon kernel (4 warps)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    attrs = {(kernel.arg_names.index(arg),): ALIGNED for arg, kind in signature.items()
             if not kind.startswith("fp")}
    source = GluonASTSource(fn=kernel, signature={**signature, **{c: "constexpr" for c in
                                                                  constants}},
                            constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": 4}).asm["ptx"]


def int_gemv_variants() -> dict:
    signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*fp16", "stride_sn": "i32",
                 "zero_ptr": "*fp16", "x_scale_ptr": "*fp32", "bias_ptr": "*bf16",
                 "y_ptr": "*bf16", "N": "i32", "WORDS": "i32"}
    variants = {  # name: (INT4, PER_CHANNEL, GROUP, TILE_GROUPS, GROUP_WORDS, BLOCK_N, warps)
        "int8_per_channel": (False, True, 4096, 1, 128, 8, 2),
        "int8_grouped": (False, False, 128, 4, 32, 16, 4),
        "int4_grouped": (True, False, 128, 4, 16, 16, 4),
        "int4_packed": (True, False, 128, 4, 16, 16, 4),
        "int4_packed_split": (True, False, 128, 2, 16, 16, 1),
        "fp8": (False, True, 4096, 1, 128, 16, 4),
    }
    out = {}
    for name, (int4, per_channel, group, groups, words, block_n, warps) in variants.items():
        ptx = compile_ptx(_int_gemv_kernel, signature, {
            "INT4": int4, "PER_CHANNEL": per_channel, "HAS_BIAS": True, "GROUP": group,
            "BLOCK_N": block_n, "TILE_GROUPS": groups, "GROUP_WORDS": words, "USE_PDL": True,
            "PACKED": name.startswith("int4_packed"), "SPLIT_K": 4 if "split" in name else 1,
            "FP8": name == "fp8", "GPU_ASM": name == "fp8",
        }, warps)
        out[name] = {"conversions_from_int": ptx.count("cvt.rn.f32.s") + ptx.count("cvt.rn.f32.u"),
                     "griddepcontrol": "griddepcontrol.wait" in ptx,
                     "packed_bf16_fma": "fma.rn.bf16x2" in ptx,
                     "e4m3_pairs_to_f16": "cvt.rn.f16x2.e4m3x2" in ptx}
    return out


def skinny_fp8_variants() -> dict:
    signature = {"xq_ptr": "*fp8e4nv", "x_scale_ptr": "*fp32", "w_ptr": "*fp8e4nv",
                 "w_scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*fp32",
                 "y_ptr": "*bf16", "counter_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                 "SPLIT_K": "i32"}
    out = {}
    for mode in ("unsplit", "reduce", "serial"):
        ptx = compile_ptx(_skinny_fp8_kernel, signature, {
            "HAS_BIAS": True, "MODE": mode, "BLOCK_N": 64, "BLOCK_K": 256, "TOKENS": 16,
            "PROMOTE": 128, "PREFETCH_TILES": 3, "USE_PDL": True, "GPU_FENCE": True,
        })
        out[mode] = {"wgmma_e4m3": "wgmma" in ptx and "e4m3" in ptx,
                     "atomic": "atom.global" in ptx, "fence": "fence.acq_rel.gpu" in ptx}
    return out


def skinny_int8_variants() -> dict:
    """skinny_fp8's kernel with int8 weights (kernels/skinny_int8.py), bf16 x, per channel
    and in groups of 64 and 128 (K tiles of the group): bf16 wgmma, the weights turned into bf16 by bit
    operations, no integer-to-float conversion instructions, nothing spilled."""
    signature = {"xq_ptr": "*bf16", "x_scale_ptr": "*fp16", "w_ptr": "*i8",
                 "w_scale_ptr": "*fp16", "bias_ptr": "*fp16", "out_ptr": "*fp32",
                 "y_ptr": "*bf16", "counter_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
                 "SPLIT_K": "i32"}
    int8 = {"HAS_BIAS": False, "MODE": "reduce", "BLOCK_N": 64, "BLOCK_K": 256, "TOKENS": 16,
            "PROMOTE": 0, "PREFETCH_TILES": 3, "USE_PDL": True, "GPU_FENCE": True,
            "W8A16": True}
    out = {}
    for name, constants in (  # as launch_skinny_int8 sets them: no L2 prefetch under 128
            ("per_channel", int8),
            ("groups_of_64", {**int8, "BLOCK_K": 64, "GROUP": 64, "PREFETCH_TILES": 0}),
            ("groups_of_128", {**int8, "BLOCK_K": 128, "GROUP": 128})):
        ptx = compile_ptx(_skinny_fp8_kernel, signature, constants)
        out[name] = {
            "wgmma_bf16": "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16" in ptx,
            "int_conversions": len(re.findall(r"cvt\.rn\.(?:bf16|f16|f32)\.s", ptx)),
            "weight_copies": len(re.findall(r"cp\.async\.cg\.shared\.global", ptx)),
            "local_memory": ".local" in ptx}
    return out


def int_gemm_variants() -> dict:
    """The kernels as the GEMM of 65-128 rows runs them (kernels/int_gemm.py's default: 128
    weight rows, 128 tokens, 8 warps), int8 on skinny_fp8's, int4 on skinny_int4's: bf16
    wgmma 128 tokens wide, no integer-to-float conversion instructions."""
    from kiln.kernels.int_gemm import IntGemmConfig

    config = IntGemmConfig()
    signature = {"xq_ptr": "*bf16", "x_scale_ptr": "*fp16", "w_ptr": "*i8",
                 "w_scale_ptr": "*fp16", "bias_ptr": "*fp16", "out_ptr": "*fp32",
                 "y_ptr": "*bf16", "counter_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
                 "SPLIT_K": "i32"}
    int8 = {"HAS_BIAS": False, "MODE": "reduce", "BLOCK_N": config.block_n,
            "BLOCK_K": config.block_k, "TOKENS": config.tokens, "PROMOTE": 0,
            "PREFETCH_TILES": 0, "USE_PDL": True, "GPU_FENCE": True, "W8A16": True}
    ptx = compile_ptx(_skinny_fp8_kernel, signature, int8, num_warps=config.num_warps)
    grouped = compile_ptx(_skinny_fp8_kernel, signature, {**int8, "GROUP": 64},
                          num_warps=config.num_warps)
    int4 = compile_ptx(_skinny_int4_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16",
        "stride_s": "i32", "bias_ptr": "*bf16", "out_ptr": "*fp32", "M": "i32", "N": "i32",
        "K": "i32", "SPLIT_K": "i32"}, {
        "GROUP": 128, "HAS_BIAS": False, "SPLIT": True, "BLOCK_N": config.block_n,
        "SUBTILES": 1, "TOKENS": config.tokens, "PREFETCH_TILES": 0, "USE_PDL": True,
        "GPU_ASM": True, "FLOAT16": False, "PAIRED": True}, num_warps=config.num_warps)
    wgmma = f"wgmma.mma_async.sync.aligned.m64n{config.tokens}k16.f32.bf16.bf16"
    out = {}
    for name, found in (("int8", ptx), ("int8_grouped", grouped), ("int4", int4)):
        out[name] = {"wgmma_bf16": wgmma in found,
                     "int_conversions": len(re.findall(r"cvt\.rn\.(?:bf16|f16|f32)\.s", found)),
                     "weight_copies": len(re.findall(r"cp\.async\.cg\.shared\.global", found)),
                     "local_memory": ".local" in found}
    return out


def skinny_int4_variants() -> dict:
    """The decode W4A16 GEMM at its default tiling, bf16 and fp16 activations, paired and
    natural column orders: bf16/fp16 wgmma, the LOP3 unpacking (4 a word), no integer
    conversions."""
    signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16",
                 "stride_s": "i32", "bias_ptr": "*bf16", "out_ptr": "*fp32", "M": "i32",
                 "N": "i32", "K": "i32", "SPLIT_K": "i32"}
    out = {}
    for name, float16, paired in (("bf16", False, True), ("fp16", True, True),
                                  ("bf16_natural", False, False)):
        x_type = "*fp16" if float16 else "*bf16"
        ptx = compile_ptx(_skinny_int4_kernel, {**signature, "x_ptr": x_type}, {
            "GROUP": 128, "HAS_BIAS": False, "SPLIT": True, "BLOCK_N": 64, "SUBTILES": 1,
            "TOKENS": 16, "PREFETCH_TILES": 2, "USE_PDL": True, "GPU_ASM": True,
            "FLOAT16": float16, "PAIRED": paired,
        })
        kind = "f16" if float16 else "bf16"
        out[name] = {"wgmma": f"wgmma.mma_async.sync.aligned.m64n16k16.f32.{kind}.{kind}" in ptx,
                     "nibble_lop3": ptx.count("0x000F000F"),
                     "packed_fma": ptx.count(f"fma.rn.{kind}x2"),
                     "conversions_from_int": ptx.count("cvt.rn.f32.s") + ptx.count("cvt.rn.f32.u"),
                     "griddepcontrol": "griddepcontrol.wait" in ptx}
    return out


def skinny_int4_gluon_variants() -> dict:
    """The Gluon twin compiles (its convert_layout(assert_trivial=True) is checked by the
    compiler: the unpacked weights need no data movement into the wgmma operand): bf16 and
    fp16, 8-64 token columns, split and unsplit; x in 16-byte loads; no shared-memory round
    trip for weights (ldmatrix) and 16-byte weight loads: from global memory into registers
    (stages 0), or 16-byte asynchronous copies into the shared-memory ring and 16-byte reads
    back (staged);
    as a programmatic dependent launch, the first weights requested before the wait for the
    previous kernel and x read after it."""
    from kiln.kernels import skinny_int4_gluon

    if not skinny_int4_gluon.available():  # a Triton before Gluon (3.5)
        return {}
    kernel = skinny_int4_gluon._skinny_int4_gluon_kernel

    out = {}
    for name, float16, tokens, split in (("bf16_t16_split", False, 16, True),
                                         ("bf16_t32_split", False, 32, True),
                                         ("bf16_t64_split", False, 64, True),
                                         ("bf16_t8_unsplit", False, 8, False),
                                         ("fp16_t16_unsplit", True, 16, False)):
        signature = {"x_ptr": "*fp16" if float16 else "*bf16", "w_ptr": "*i32",
                     "scale_ptr": "*fp16", "zero_ptr": "*fp16", "stride_s": "i32",
                     "bias_ptr": "*bf16", "out_ptr": "*fp32" if split else "*bf16",
                     "M": "i32", "N": "i32", "K": "i32", "K_WORDS": "i32", "SPLIT_K": "i32"}
        constants = {"GROUP": 128, "TOKENS": tokens, "SPLIT": split, "HAS_BIAS": not split,
                     "FLOAT16": float16, "STAGES": 0 if split else 3, "X_TILES": 7,
                     "USE_PDL": True}
        ptx = compile_gluon_ptx(kernel, signature, constants)
        kind = "f16" if float16 else "bf16"
        wgmma = f"wgmma.mma_async.sync.aligned.m64n{tokens}k16.f32.{kind}.{kind}"
        wide_copy = r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10"
        wait = ptx.find("griddepcontrol.wait")
        first_weight = min(i for i in (ptx.find("cp.async.cg"), ptx.find("ld.global.v4"))
                           if i >= 0)
        first_masked_load = re.search(r"@%p\d+ ld\.global", ptx).start()  # x (tokens ≥ M: 0)
        before_mma = ptx[:ptx.find("wgmma.mma_async")]
        out[name] = {"wgmma": wgmma in ptx,
                     # (one-row ldmatrix.x1 reads the per-step zero points and scales when staged)
                     "weight_ldmatrix": (ptx.count("ldmatrix")
                                         - ptx.count("ldmatrix.sync.aligned.m8n8.x1.")),
                     "stages": constants["STAGES"],
                     "wide_weight_loads": (ptx.count("ld.global.v4.b32")
                                           + ptx.count("ld.global.v4.u32")),
                     "wide_async_copies": len(re.findall(wide_copy, ptx)),
                     "wide_shared_reads": ptx.count("ld.shared.v4.b32"),
                     "nibble_lop3": ptx.count("0x000F000F"),
                     # PDL: weights requested before the wait, x read after it
                     "pdl_weights_before_x": 0 <= wait and first_weight < wait < first_masked_load,
                     "launch_dependents": "griddepcontrol.launch_dependents" in ptx,
                     # x's loads are the masked ones (tokens ≥ M read as 0) before the
                     # first MMA (the bias's come after it)
                     "x_two_byte_loads": len(re.findall(r"@%p\d+ ld\.global\.b16",
                                                        before_mma)),
                     "x_wide_loads": len(re.findall(r"@%p\d+ ld\.global\.v4", before_mma))}
    return out


def skinny_int8_gluon_variants() -> dict:
    """The Gluon int8 twin compiles (its convert_layout(assert_trivial=True): the converted
    weights, and grouped scales broadcast over a thread's words, need no data movement), bf16
    and fp16, 8 to 64 token columns, per channel and grouped: 16-byte weight and x loads, no
    two-byte x loads, no integer-to-float conversions, no shared-memory reads but the MMA's,
    grouped scales loaded once a row a step."""
    from kiln.kernels import skinny_int8_gluon

    if not skinny_int8_gluon.available():  # a Triton before Gluon (3.5)
        return {}
    kernel = skinny_int8_gluon._skinny_int8_gluon_kernel
    out = {}
    for name, float16, tokens, split, group in (("bf16_t16_split", False, 16, True, 0),
                                                ("bf16_t8_unsplit", False, 8, False, 0),
                                                ("fp16_t16_split", True, 16, True, 0),
                                                ("bf16_t16_split_g32", False, 16, True, 32),
                                                ("fp16_t8_unsplit_g128", True, 8, False, 128),
                                                ("bf16_t32_split", False, 32, True, 0),
                                                ("bf16_t64_unsplit", False, 64, False, 0),
                                                ("fp16_t64_split_g32", True, 64, True, 32)):
        x_type = "*fp16" if float16 else "*bf16"
        signature = {"x_ptr": x_type, "w_ptr": "*i32", "scale_ptr": "*fp16", "stride_s": "i32",
                     "bias_ptr": x_type, "out_ptr": "*fp32" if split else x_type,
                     "M": "i32", "N": "i32", "K": "i32", "K_WORDS": "i32", "SPLIT_K": "i32"}
        constants = {"TOKENS": tokens, "SPLIT": split, "HAS_BIAS": not split,
                     "FLOAT16": float16, "USE_PDL": True, "GROUP": group}
        ptx = compile_gluon_ptx(kernel, signature, constants)
        kind = "f16" if float16 else "bf16"
        before_mma = ptx[:ptx.find("wgmma.mma_async")]
        out[name] = {"wgmma": f"wgmma.mma_async.sync.aligned.m64n{tokens}k16.f32.{kind}.{kind}"
                              in ptx,
                     "wide_loads": ptx.count("ld.global.v4.b32"),
                     "x_two_byte_loads": len(re.findall(r"@%p\d+ ld\.global\.b16",
                                                        before_mma)),
                     "int_conversions": len(re.findall(r"cvt\.rn\.(?:bf16|f16|f32)\.s", ptx)),
                     "shared_reads": len(re.findall(r"ld\.shared|ldmatrix", ptx)),
                     "grouped": bool(group),
                     # two-byte loads, x's being 16-byte: the scales (per channel: one a
                     # row after the loop; grouped: one a row a step) and the bias
                     "scale_loads": len(re.findall(r"ld\.global\.b16", ptx)),
                     "launch_dependents": "griddepcontrol.launch_dependents" in ptx}
    return out


def fp8_decode_variants() -> dict:
    """The decode kernel on an FP8 cache (V dims-major, 32-token blocks) in float16 dots, at
    its default tiling: K and V both widened from two-byte pairs, no byte loads from shared
    memory, every tile by an asynchronous copy; and in E4M3 dots: warpgroup MMA on E4M3
    operands, nothing converted."""
    signature = {"q_ptr": "*bf16", "stride_qt": "i32", "stride_qh": "i32",
                 "cache_ptr": "*fp8e4nv", "stride_c_kind": "i32", "stride_c_block": "i32",
                 "stride_c_slot": "i32", "stride_c_head": "i32", "block_tables_ptr": "*i32",
                 "stride_bt": "i32", "seq_lens_ptr": "*i32", "out_ptr": "*bf16",
                 "stride_ot": "i32", "stride_oh": "i32", "part_out_ptr": "*fp32",
                 "part_lse_ptr": "*fp32", "qk_scale": "fp32", "window": "i32",
                 "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    shape = {"NUM_HEADS": 32, "GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 32,
             "BLOCK_N": 64, "NUM_SPLITS": 1, "MIN_SPLIT": MIN_DECODE_SPLIT_TOKENS,
             "USE_PDL": True, "V_RUN": 32}
    ptx = compile_ptx(_paged_decode_kernel, signature, {
        **shape, "DOT_DTYPE": triton.language.float16, "PRECISION": "tf32", "FP8": True,
        "Q_TO_F16": True,
    }, num_warps=4)
    e4m3 = compile_ptx(_paged_decode_e4m3_kernel, signature, {**shape, "P_SCALE": E4M3_P_SCALE},
                       num_warps=4)
    return {"byte_loads_from_shared": ptx.count("ld.shared.b8") + ptx.count("ld.shared.u8"),
            "pair_conversions": ptx.count("cvt.rn.f16x2.e4m3x2"),
            "async_copies": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "e4m3_wgmma": "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3" in e4m3,
            "e4m3_conversions": e4m3.count("cvt.rn.f16x2.e4m3x2"),
            "e4m3_async_copies": e4m3.count("cp.async.cg")}

if __name__ == "__main__":
    print(json.dumps({"int_gemv": int_gemv_variants(), "skinny_fp8": skinny_fp8_variants(),
                      "skinny_int8": skinny_int8_variants(),
                      "int_gemm": int_gemm_variants(),
                      "skinny_int4": skinny_int4_variants(),
                      "skinny_int4_gluon": skinny_int4_gluon_variants(),
                      "skinny_int8_gluon": skinny_int8_gluon_variants(),
                      "fp8_decode": fp8_decode_variants()}))
