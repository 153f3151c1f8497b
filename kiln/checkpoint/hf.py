"""Hugging Face model directories: config.json, generation_config.json, tokenizer files,
weights as one or many *.safetensors (with model.safetensors.index.json) or *.bin.

Every file is checked before it is trusted: the JSON parses, each safetensors header fits
its file and every tensor's bytes lie inside it. `.bin` files go through
`torch.load(weights_only=True)`, which refuses pickled code. Nothing from the directory is
ever imported or executed (an `auto_map` entry is ignored).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from kiln.checkpoint.base import Checkpoint
from kiln.checkpoint.quantized import quantized_source
from kiln.errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: {what} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


def check_safetensors_file(path: Path) -> dict:
    """Validate a safetensors header against the file size before any tensor is read.
    Returns the header (tensor name → {dtype, shape, data_offsets})."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: safetensors file is truncated (no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: safetensors file is truncated or corrupt "
                f"(header claims {header_len} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            expected = count * _SAFETENSORS_DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: safetensors entry {name!r} is malformed") from None
        if not 0 <= begin <= end or end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent data offsets")
        if end > data_len:
            raise CheckpointError(
                f"{path}: safetensors file is truncated: tensor {name!r} ends at byte "
                f"{end} of a {data_len}-byte data section"
            )
    return header


class SafetensorsSource:
    """Tensors spread over one or more safetensors files, read lazily by name."""

    def __init__(self, files: list[Path]) -> None:
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            for name, info in check_safetensors_file(path).items():
                if name == "__metadata__":
                    continue
                if name in self._file_of:
                    raise CheckpointError(f"tensor {name!r} appears in two files")
                self._file_of[name] = path
                self._shapes[name] = tuple(info["shape"])

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)


class TorchBinSource:
    """Legacy pytorch_model*.bin files, loaded with weights_only=True (no pickled code)."""

    def __init__(self, files: list[Path]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # torch raises many types for a bad or unsafe file
                raise CheckpointError(f"{path}: cannot load .bin weights safely: {error}")
            self._tensors.update(state)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _weight_files(directory: Path) -> tuple[str, list[Path]]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        files = sorted({directory / name for name in weight_map.values()})
        for path in files:
            if not path.is_file() or path.parent != directory:
                raise CheckpointError(f"{index}: lists {path.name}, which is not in {directory}")
        return "safetensors", files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return "safetensors", files
    files = sorted(directory.glob("pytorch_model*.bin"))
    if files:
        return "bin", files
    raise CheckpointError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")


def read_hf_directory(directory: str | Path, *, weights: bool = True) -> Checkpoint:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = read_json(directory / "config.json", "config.json")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise CheckpointError(
            f"{directory / 'config.json'}: has no 'architectures' list naming the model class"
        )
    generation_path = directory / "generation_config.json"
    generation = read_json(generation_path, "generation_config.json") if generation_path.is_file() else {}

    tensors, files = None, []
    if weights:
        kind, files = _weight_files(directory)
        tensors = SafetensorsSource(files) if kind == "safetensors" else TorchBinSource(files)
    # A quantised checkpoint's tensors come out converted to kiln's layout of its scheme.
    quantization, tensors = quantized_source(directory, config, tensors)
    quant_config_file = directory / "hf_quant_config.json"

    tokenizer_files = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    has_tokenizer = any(p.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for p in tokenizer_files)

    def save_tokenizer(destination: Path) -> None:
        destination.mkdir(parents=True, exist_ok=True)
        for path in tokenizer_files:
            shutil.copyfile(path, destination / path.name)

    return Checkpoint(
        config=config,
        tensors=tensors,
        save_tokenizer=save_tokenizer if has_tokenizer else None,
        source_files=[directory / "config.json", *files]
        + ([quant_config_file] if quant_config_file.is_file() else []),
        generation_config=generation,
        quantization=quantization,
    )
