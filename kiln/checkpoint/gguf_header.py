"""GGUF header validation: walk the header with every length, count, dimension and tensor
range checked against the file size before `gguf.GGUFReader` (which trusts them all) reads it.

A damaged file could otherwise make GGUFReader loop for a very long time, read past the end
or allocate absurd arrays; here it becomes one CheckpointError naming what is wrong.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from kiln.errors import CheckpointError

# Limits from the GGUF spec / ggml: at most 4 dimensions; a dimension beyond 2**31 is not a
# model we can build (and is how a flipped high bit shows up).
_MAX_DIMS = 4
MAX_DIM = 2**31
# GGUF allows arrays of arrays; no model file nests deeper than this, and bounding it keeps
# GGUFReader's recursive parser away from RecursionError.
_MAX_ARRAY_NESTING = 2
_SUPPORTED_VERSIONS = (2, 3)

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip
INT_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}  # fmt: skip
FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF lists dimensions innermost first
    ggml_type: GGMLQuantizationType


def corrupt_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: GGUF file is truncated or corrupt: {what}")


class _HeaderScanner:
    """Walks the header the way GGUFReader will, checking each read against the file end."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, num_bytes: int, what: str) -> int:
        if num_bytes > len(self.buf) - self.pos:
            raise corrupt_error(
                self.path,
                f"{what} at byte {self.pos} needs {num_bytes} bytes, "
                f"but the file ends at byte {len(self.buf)}",
            )
        start, self.pos = self.pos, self.pos + num_bytes
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        length = self.u64(f"length of {what}")
        start = self.take(length, what)
        return self.buf[start : start + length]

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise corrupt_error(self.path, f"{what} is not UTF-8: {raw[:40]!r}") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise corrupt_error(self.path, f"{what} has unknown value type {raw}") from None

    def skip_value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[vtype], what)
        elif vtype == GGUFValueType.STRING:
            self.string(what)
        else:  # ARRAY
            if depth >= _MAX_ARRAY_NESTING:
                raise corrupt_error(self.path, f"{what} nests arrays more than {depth} deep")
            item_type = self.value_type(f"items of {what}")
            count = self.u64(f"length of {what}")
            if item_type in _SCALAR_SIZES:
                self.take(count * _SCALAR_SIZES[item_type], what)
                return
            # Each string / array item takes at least its 8-byte length: bound the loop.
            if count * 8 > len(self.buf) - self.pos:
                raise corrupt_error(self.path, f"{what} claims {count} items, more than the file holds")
            for _ in range(count):
                self.skip_value(item_type, what, depth + 1)


def _scan_header(path: Path, buf: mmap.mmap) -> dict[str, TensorInfo]:
    """Checks the whole header against the file size; returns the tensors it describes."""
    scan = _HeaderScanner(path, buf)
    magic = buf[:4]
    if magic != b"GGUF":
        raise corrupt_error(path, f"bad magic {magic!r} (expected b'GGUF'); is this a GGUF file?")
    scan.take(4, "magic")
    version = scan.u32("version")
    if version & 0xFFFF == 0 and version != 0:
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    if version not in _SUPPORTED_VERSIONS:
        raise corrupt_error(path, f"GGUF version {version} (supported: {_SUPPORTED_VERSIONS})")
    tensor_count = scan.u64("tensor count")
    kv_count = scan.u64("metadata count")

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for index in range(kv_count):
        key = scan.text(f"metadata key #{index}")
        if key in keys:
            raise corrupt_error(path, f"metadata key {key!r} appears twice")
        keys.add(key)
        vtype = scan.value_type(f"metadata {key!r}")
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise corrupt_error(path, f"general.alignment has type {vtype.name}, expected UINT32")
            alignment = scan.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise corrupt_error(path, f"general.alignment {alignment} is not a power of two")
        else:
            scan.skip_value(vtype, f"metadata {key!r}")

    ranges: list[tuple[int, int, str]] = []  # (offset, size, name), offsets data-relative
    tensors: dict[str, TensorInfo] = {}
    for index in range(tensor_count):
        name = scan.text(f"name of tensor #{index}")
        if name in tensors:
            raise corrupt_error(path, f"tensor {name!r} appears twice")
        n_dims = scan.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise corrupt_error(path, f"tensor {name!r} has {n_dims} dimensions")
        dims = [scan.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        if not all(1 <= d <= MAX_DIM for d in dims):
            raise corrupt_error(path, f"tensor {name!r} has dimensions {dims}")
        raw_type = scan.u32(f"type of tensor {name!r}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise corrupt_error(path, f"tensor {name!r} has unknown GGML type {raw_type}") from None
        if dims[0] % block_size:
            raise corrupt_error(
                path, f"tensor {name!r} rows of {dims[0]} are not whole {ggml_type.name} blocks"
            )
        offset = scan.u64(f"offset of tensor {name!r}")
        if offset % alignment:
            raise corrupt_error(path, f"tensor {name!r} offset {offset} is not {alignment}-aligned")
        ranges.append((offset, math.prod(dims) // block_size * type_size, name))
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type)

    data_start = -(-scan.pos // alignment) * alignment
    for offset, size, name in ranges:
        if data_start + offset + size > len(buf):
            raise corrupt_error(
                path,
                f"tensor {name!r} data (bytes {data_start + offset}..{data_start + offset + size})"
                f" runs past the end of the file ({len(buf)} bytes)",
            )
    return tensors


def open_reader(path: Path) -> tuple[gguf.GGUFReader, dict[str, TensorInfo]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    if size < 24:  # magic, version, two counts
        raise corrupt_error(path, f"the file is only {size} bytes")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        infos = _scan_header(path, buf)
    try:
        reader = gguf.GGUFReader(path)
    # The scan mirrors GGUFReader's parse, so this is a safety net, not an expected path.
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise corrupt_error(path, f"gguf could not parse it ({exc})") from exc
    return reader, infos
