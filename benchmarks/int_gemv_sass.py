"""Static SASS of int_gemv's inner loop for sm_90, counted on a machine without a GPU: the
kernel compiled ahead of time (as tests/kernels/sm90_lowering.py does), the cubin
disassembled by Triton's own nvdisasm, the longest loop body (a label to the backward branch
that returns to it) counted per weight it handles, by opcode.

Why: at one row a weight-only GEMV can be issue-bound (the card issues ~4 thread
instructions per int4 weight, ~8 per int8 weight, at the copy rate; BENCHMARKS.md), so the
count predicts which variants are worth a device call. It is an upper bound on work per
weight, not a time: the packed int4 loop counted 4.58 against 8.14 at 16 x 64 x 4 (4.64 and
8.20 since split K's bounds) and streamed gate|up 22 % faster at the same tiling, but the
narrow matrices hardly at all (too few programs).

Usage: python benchmarks/int_gemv_sass.py [--format int4|int8|fp8] [--group 128]
           [--tilings 16x64x4 16x32x1x4] [--fp32-unpacking] [--dump]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.append(str(Path(__file__).resolve().parents[1]))

from kiln.kernels.int_gemv import IntGemvConfig, _int_gemv_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SIGNATURE = {"x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*fp16", "stride_sn": "i32",
             "zero_ptr": "*fp16", "x_scale_ptr": "*fp32", "bias_ptr": "*bf16",
             "y_ptr": "*bf16", "N": "i32", "WORDS": "i32"}


def sass(config: IntGemvConfig, fmt: str, group: int, packed: bool) -> str:
    """The kernel's sm_90 SASS for this tiling, as int_gemv / fp8_gemv would specialise it
    (fp8: per channel, whatever --group says)."""
    int4, fp8 = fmt == "int4", fmt == "fp8"
    per_word = 8 if int4 else 4
    group_words = min(config.tile_words, group // per_word)
    constants = {"SPLIT_K": config.split_k, "INT4": int4, "PER_CHANNEL": fp8,
                 "HAS_BIAS": False, "GROUP": group, "BLOCK_N": config.block_n,
                 "TILE_GROUPS": config.tile_words // group_words, "GROUP_WORDS": group_words,
                 "USE_PDL": True, "PACKED": packed and int4, "FP8": fp8, "GPU_ASM": fp8}
    aligned = [["tt.divisibility", 16]]
    attrs = {(_int_gemv_kernel.arg_names.index(name),): aligned
             for name, kind in SIGNATURE.items() if not kind.startswith("fp")}
    source = ASTSource(fn=_int_gemv_kernel,
                       signature={**SIGNATURE, **{name: "constexpr" for name in constants}},
                       constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": config.num_warps})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True,
                              text=True, check=True).stdout


def loop_body(listing: str) -> list[str]:
    """The longest run from a label to a backward branch to it: the K loop."""
    instructions, labels = [], {}
    for line in listing.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if instruction:
            instructions.append(instruction.group(1))
    best: list[str] = []
    for index, text in enumerate(instructions):
        branch = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", text)
        if branch and labels.get(branch.group(1), index) < index:
            body = instructions[labels[branch.group(1)]:index + 1]
            best = body if len(body) > len(best) else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--format", choices=["int4", "int8", "fp8"], default="int4")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--tilings", nargs="*", default=["16x64x4", "16x128x4", "16x32x1"])
    parser.add_argument("--fp32-unpacking", action="store_true",
                        help="int4 as on fp16 / fp32 x (KILN_INT_GEMV_PACKED=0)")
    parser.add_argument("--dump", action="store_true", help="print each loop body")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="kiln-sass-"))
    int4 = args.format == "int4"
    for tag in args.tilings:
        config = IntGemvConfig.parse(tag)
        body = loop_body(sass(config, args.format, args.group, not args.fp32_unpacking))
        weights = config.block_n * config.tile_words * (8 if int4 else 4)
        per_weight = len(body) * config.num_warps * 32 / weights
        opcodes = collections.Counter(
            re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for text in body)
        print(f"{args.format} {tag:12} {len(body):4} instructions a thread a tile, "
              f"{per_weight:.2f} a weight  {dict(opcodes.most_common(8))}")
        if args.dump:
            print("\n".join(body))


if __name__ == "__main__":
    main()
