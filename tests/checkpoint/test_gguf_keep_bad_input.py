"""`kiln build x.gguf --quant keep` of a file whose kept blocks have inf / NaN scales: one
line naming the tensor, the count and the first block, and no engine left behind. A
negative d is normal GGUF and is kept, and so is a Q4_1 block whose zero point would not fit
float16."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kiln.checkpoint.gguf import read_gguf
from kiln.checkpoint.packing import dequantize_int4
from kiln.cli import main
from tests.checkpoint.test_gguf import write_tiny_gguf
from tests.compiler.test_build_errors import assert_nothing_left, assert_one_line_error

TENSOR = "blk.0.ffn_down.weight"  # (64 rows, 128 inputs): 4 blocks a row (Q4_K: below)
BLOCK_BYTES = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q4_K: 144, Q.Q6_K: 210}


def write_gguf(path: Path, qtype: Q) -> Path:
    write_tiny_gguf(path, qtype=qtype, hidden=64, inter=128, heads=4, kv_heads=2, layers=2,
                    tokenizer=False)
    return path


def set_block_scales(path: Path, qtype: Q, blocks: list[int], value: float,
                     offset: int = 0) -> None:
    """Write `value` as the float16 at `offset` (0: d, 2: Q4_1's m) of each block of TENSOR."""
    reader = gguf.GGUFReader(path)
    start = int(next(t for t in reader.tensors if t.name == TENSOR).data_offset)
    del reader  # its memory map
    raw = bytearray(path.read_bytes())
    for block in blocks:
        struct.pack_into("<e", raw, start + block * BLOCK_BYTES[qtype] + offset, value)
    path.write_bytes(bytes(raw))


def build_keep(capsys, source: Path, out: Path) -> tuple[int, str]:
    code = main(["build", str(source), "-o", str(out), "--quant", "keep", "--dtype", "float32"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("qtype, value", [
    (Q.Q8_0, float("nan")), (Q.Q8_0, float("inf")), (Q.Q4_0, float("-inf")),
    (Q.Q4_1, float("nan")),
], ids=["Q8_0-nan", "Q8_0-inf", "Q4_0-neg-inf", "Q4_1-nan"])
def test_non_finite_d_is_refused_naming_tensor_count_and_first_block(
        tmp_path, capsys, qtype, value):
    path = write_gguf(tmp_path / "model.gguf", qtype)
    set_block_scales(path, qtype, [41, 17, 200], value)
    code, err = build_keep(capsys, path, tmp_path / "engine")
    assert_one_line_error(
        code, err, f"{path}: GGUF tensor {TENSOR} has 3 blocks with non-finite scales "
        "(first: block 17); the file is corrupt")
    assert_nothing_left(tmp_path, "engine")


def test_non_finite_q4_1_minimum_is_refused(tmp_path, capsys):
    path = write_gguf(tmp_path / "model.gguf", Q.Q4_1)
    set_block_scales(path, Q.Q4_1, [5], float("inf"), offset=2)  # m; d stays finite
    code, err = build_keep(capsys, path, tmp_path / "engine")
    assert_one_line_error(code, err, f"GGUF tensor {TENSOR} has 1 blocks with non-finite "
                          "scales (first: block 5)")
    assert_nothing_left(tmp_path, "engine")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_negative_d_is_kept(tmp_path, capsys, qtype):
    path = write_gguf(tmp_path / "model.gguf", qtype)
    set_block_scales(path, qtype, [3], -0.5)
    scale = read_gguf(path, keep_quantized=True).tensors.get(
        "model.layers.0.mlp.down_proj.weight_scale")
    assert scale[0, 3] == -0.5
    code, err = build_keep(capsys, path, tmp_path / "engine")
    assert code == 0, err
    assert (tmp_path / "engine" / "engine.json").is_file()


def test_q4_1_block_whose_zero_overflows_float16_is_kept_as_its_mean(tmp_path, capsys):
    """−m/d past float16's range (d = 2⁻²⁴, m = 2: −m/d ≈ −3.4e7) used to become an inf zero
    point and NaN outputs. Such a block's 16 levels span 15 · 2⁻²⁴, far below bfloat16's
    resolution of m, so it is kept as one value, m + d · mean(q); the other blocks are kept
    exactly as before."""
    path = write_gguf(tmp_path / "model.gguf", Q.Q4_1)
    before = read_gguf(path, keep_quantized=True).tensors
    module = "model.layers.0.mlp.down_proj"
    expected = dequantize_int4(*(before.get(f"{module}.{name}")
                                 for name in ("qweight", "weight_scale", "weight_zero")))
    set_block_scales(path, Q.Q4_1, [6], 2.0 ** -24)  # d, the smallest float16 above 0
    set_block_scales(path, Q.Q4_1, [6], 2.0, offset=2)  # m
    kept = read_gguf(path, keep_quantized=True).tensors
    zero = kept.get(f"{module}.weight_zero")
    assert torch.isfinite(zero).all()
    got = dequantize_int4(kept.get(f"{module}.qweight"), kept.get(f"{module}.weight_scale"), zero)
    row, block = divmod(6, 4)  # 4 blocks a row
    columns = slice(32 * block, 32 * block + 32)
    torch.testing.assert_close(got[row, columns], torch.full((32,), 2.0), atol=2 ** -20, rtol=0)
    got[row, columns] = expected[row, columns]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # nothing else moved
    code, err = build_keep(capsys, path, tmp_path / "engine")
    assert code == 0, err


def write_k_quant_gguf(path: Path, qtype: Q = Q.Q4_K) -> Path:
    """K-quants need 256-column super-blocks: TENSOR is then (256 rows, 512 inputs), 2 a row."""
    write_tiny_gguf(path, qtype=qtype, hidden=256, inter=512, heads=4, kv_heads=2, layers=2,
                    tokenizer=False)
    return path


def test_q6_k_non_finite_d_is_refused(tmp_path, capsys):
    path = write_k_quant_gguf(tmp_path / "model.gguf", Q.Q6_K)
    set_block_scales(path, Q.Q6_K, [2], float("inf"), offset=208)  # d
    code, err = build_keep(capsys, path, tmp_path / "engine")
    assert_one_line_error(code, err, f"GGUF tensor {TENSOR} has 1 blocks with non-finite "
                          "scales (first: block 2)")
    assert_nothing_left(tmp_path, "engine")


@pytest.mark.parametrize("offset, value, message", [
    (0, float("nan"), "has 1 blocks with non-finite scales (first: block 3)"),  # d
    (2, float("inf"), "has 1 blocks with non-finite scales (first: block 3)"),  # dmin
    # d · sc past float16's range (the scale kiln stores): only a corrupt file has it.
    (0, 60000.0, "has a group whose scale lies past float16's range"),
], ids=["d-nan", "dmin-inf", "scale-overflow"])
def test_q4_k_corrupt_scales_are_refused(tmp_path, capsys, offset, value, message):
    path = write_k_quant_gguf(tmp_path / "model.gguf")
    set_block_scales(path, Q.Q4_K, [3], value, offset=offset)
    if offset == 0 and value == 60000.0:  # every sub-block's 6-bit scale at its largest, 63
        reader = gguf.GGUFReader(path)
        start = int(next(t for t in reader.tensors if t.name == TENSOR).data_offset)
        del reader
        raw = bytearray(path.read_bytes())
        raw[start + 3 * 144 + 4 : start + 3 * 144 + 16] = bytes([0xFF] * 12)
        path.write_bytes(bytes(raw))
    code, err = build_keep(capsys, path, tmp_path / "engine")
    assert_one_line_error(code, err, f"GGUF tensor {TENSOR} {message}")
    assert_nothing_left(tmp_path, "engine")
