"""The engine format: a directory of plain safetensors, a JSON manifest and the tokenizer.

    <engine>/engine.json          manifest (see DESIGN.md "Engine format")
    <engine>/rank0.safetensors    weights: fused, cast, (one file per TP/PP rank later)
    <engine>/tokenizer/           tokenizer.json, tokenizer_config.json, generation_config.json

Loading checks the format version, the architecture and every file's size and sha256, and
says which file is wrong and how. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

import kiln
from kiln.errors import EngineFormatError
from kiln.models.config import ModelConfig

FORMAT = "kiln-engine"
FORMAT_VERSION = 1
MANIFEST = "engine.json"
TOKENIZER_DIR = "tokenizer"


def sha256_file(path: Path, chunk_bytes: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineInfo:
    path: Path
    manifest: dict
    model_config: ModelConfig

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["build"]["dtype"])

    @property
    def max_model_len(self) -> int:
        return self.manifest["build"]["max_model_len"]

    @property
    def tokenizer_dir(self) -> Path | None:
        path = self.path / TOKENIZER_DIR
        return path if path.is_dir() else None

    @property
    def generation_config(self) -> dict:
        return self.manifest.get("generation_config", {})


def write_engine(
    output: Path,
    *,
    weights: dict[str, torch.Tensor],
    model_config: ModelConfig,
    build: dict,
    source: dict,
    generation_config: dict,
    save_tokenizer: Callable[[Path], None] | None,
    force: bool = False,
) -> Path:
    """Write into a temporary sibling directory, then rename: a failed build leaves nothing."""
    output = Path(output)
    if output.exists() and not force:
        raise EngineFormatError(f"{output} already exists; pass --force to replace it")
    staging = output.parent / f".{output.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(weights, staging / "rank0.safetensors", metadata={"format": "pt"})
        if save_tokenizer is not None:
            save_tokenizer(staging / TOKENIZER_DIR)
        files = {
            str(path.relative_to(staging)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kiln_version": kiln.__version__,
            "architecture": model_config.architecture,
            "model": model_config.to_dict(),
            "build": build,
            "quant": {"scheme": "none"},
            "parallel": {"tp": 1, "pp": 1},
            "generation_config": generation_config,
            "files": files,
            "source": source,
            "tuning": {},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def read_manifest(engine_dir: Path) -> dict:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise EngineFormatError(f"{engine_dir}: not a kiln engine (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EngineFormatError(f"{path}: corrupt manifest: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineFormatError(f"{path}: not a kiln engine manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise EngineFormatError(f"{path}: format_version is missing")
    if version > FORMAT_VERSION:
        raise EngineFormatError(
            f"{engine_dir}: engine format version {version} is newer than this kiln "
            f"{kiln.__version__} reads (up to {FORMAT_VERSION}); upgrade kiln or rebuild the engine"
        )
    return manifest


def verify_files(engine_dir: Path, manifest: dict, *, hashes: bool = True) -> None:
    """Every file in the manifest exists with its recorded size (and sha256)."""
    engine_dir = Path(engine_dir)
    for name, expected in manifest["files"].items():
        path = engine_dir / name
        if not path.is_file():
            raise EngineFormatError(f"{engine_dir}: file {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise EngineFormatError(
                f"{engine_dir}: file {name} has {size} bytes, the manifest says {expected['bytes']}"
            )
        if hashes:
            found = sha256_file(path)
            if found != expected["sha256"]:
                raise EngineFormatError(
                    f"{engine_dir}: file {name} is corrupt: sha256 {found[:16]}… does not match "
                    f"the manifest's {expected['sha256'][:16]}…; the file changed after the build"
                )


def open_engine(engine_dir: str | Path, *, verify_hashes: bool = True) -> EngineInfo:
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    verify_files(engine_dir, manifest, hashes=verify_hashes)
    try:
        model_config = ModelConfig.from_dict(manifest["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise EngineFormatError(f"{engine_dir}: manifest 'model' section is invalid: {error}")
    if manifest.get("architecture") != model_config.architecture:
        raise EngineFormatError(f"{engine_dir}: manifest architecture disagrees with its model")
    return EngineInfo(engine_dir, manifest, model_config)


def load_engine_model(
    engine: EngineInfo, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The model with the engine's weights on `device`, in `dtype` (default: the engine's)."""
    from kiln.models.registry import get_model_class

    model_class = get_model_class(engine.model_config.architecture)
    with torch.device("meta"):
        model = model_class(engine.model_config)
    weights = load_file(engine.path / "rank0.safetensors", device=str(device))
    if dtype is not None and dtype != engine.dtype:
        weights = {name: tensor.to(dtype) for name, tensor in weights.items()}
    expected = set(model.engine_state_dict())
    if set(weights) != expected:
        missing = sorted(expected - set(weights))
        extra = sorted(set(weights) - expected)
        raise EngineFormatError(
            f"{engine.path}: rank0.safetensors does not match {engine.model_config.architecture}"
            f" (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    model.load_state_dict(weights, strict=False, assign=True)
    # Derived buffers (RoPE tables) were computed on the CPU at construction.
    return model.to(device).eval()
