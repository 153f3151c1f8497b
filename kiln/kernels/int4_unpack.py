"""The PTX that unpacks a 32-bit word of eight int4 weights into 16-bit floats, shared by the
decode int4 kernels (kernels/skinny_int4.py and its Gluon twin kernels/skinny_int4_gluon.py)
and batch-1 int_gemv's packed dot (kernels/int_gemv.py).

The "magic number" conversion of FasterTransformer and Marlin: a nibble OR-ed into the
mantissa of bf16 128.0 (float16: 1024.0), whose mantissa counts in steps of 1 there, reads as
128 + q; one LOP3 does it for two nibbles, (q_l, q_{l+4}) into the two halves of a register.
"""

from __future__ import annotations

import triton.language as tl


def nibble_pair_lines(word: str, addend: str, float16: bool) -> list[str]:
    """PTX lines: word's nibbles l and l + 4 as 16-bit floats (magic + q) · 1 + addend in the
    two halves of t_l, l = 0..3 (the caller declares t0..t3, s1..s3 and `one` = 1.0 in both
    halves): three shifts, one LOP3 and one packed FMA per two weights."""
    magic = "0x64006400" if float16 else "0x43004300"
    kind = "f16x2" if float16 else "bf16x2"
    lines = [f"shr.u32 s{i}, {word}, {4 * i};" for i in (1, 2, 3)]
    lines += [f"lop3.b32 t{i}, {word if i == 0 else f's{i}'}, 0x000F000F, {magic}, 0xEA;"
              for i in range(4)]
    return lines + [f"fma.rn.{kind} t{i}, t{i}, one, {addend};" for i in range(4)]


def unpack_assembly(float16: bool) -> str:
    """PTX: a word ($8) → its 8 nibbles as 16-bit floats q − z ($0..$7 = nibbles 0..7), with
    $9 holding −(magic + z) in both halves: (magic + q) · 1 + (−(magic + z)), one packed FMA
    per two weights (sm_80+ for bf16)."""
    lines = ["{", ".reg .b32 t0, t1, t2, t3, s1, s2, s3, one;",
             f"mov.b32 one, {'0x3C003C00' if float16 else '0x3F803F80'};"]
    lines += nibble_pair_lines("$8", "$9", float16)
    lines += [f"mov.b32 {{${i}, ${i + 4}}}, t{i};" for i in range(4)]
    return "\n".join(lines + ["}"])


ASM_BF16 = tl.constexpr(unpack_assembly(float16=False))
ASM_F16 = tl.constexpr(unpack_assembly(float16=True))
