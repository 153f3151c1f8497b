"""The engine format: a directory of plain safetensors, a JSON manifest and the tokenizer.

    <engine>/engine.json          manifest (docs/DESIGN.md, "Engine format")
    <engine>/rank{r}.safetensors  rank r's weights: fused, cast, quantised, sharded
    <engine>/tokenizer/           tokenizer.json, tokenizer_config.json, generation_config.json

The manifest's "quant" section is the scheme and its parameters (kiln/quant/config.py:
{"scheme": "none"} for plain weights); "parallel" is how the weights are split over ranks
(kiln/parallel/layout.py: {"tp": 1, "pp": 1, "rank_files": ["rank0.safetensors"]}).

`write_engine` writes one atomically; `open_engine` reads the manifest (bounded in size and
nesting, then checked against manifest_schema.py: one line naming the wrong field), checks the
format version, the architecture, the quant and parallel sections and every file's size and sha256
(verify.py), and says which file or field is wrong and how. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from kiln.compiler.manifest_schema import (
    MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, ManifestSchema, first_problem, json_depth,
)
from kiln.compiler.verify import HASH_CHUNK_BYTES, hash_file, verify_files
from kiln.errors import EngineFormatError
from kiln.models.config import ModelConfig
from kiln.parallel.layout import EngineLayout
from kiln.quant.config import QuantConfig, quant_config_from_manifest
from kiln.version import __version__

FORMAT = "kiln-engine"
FORMAT_VERSION = 1
MANIFEST = "engine.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class LoadTimings:
    """Where an engine's start-up time went before KV allocation and graph capture: filled in
    by open_engine (verify_*) and load_engine_model (construct_*, weights_*)."""

    # open_engine: every file's size, and with verify_hashes its sha256 (chunks in parallel).
    verify_seconds: float = 0.0
    verified_bytes: int = 0  # bytes hashed; 0 when hashes were not checked
    verify_threads: int = 0
    # load_engine_model: the model on the meta device, its derived buffers (RoPE tables,
    # computed on the CPU) built and moved to the device.
    construct_seconds: float = 0.0
    # load_engine_model: this rank's weights file read and copied to the device (synchronised).
    weights_seconds: float = 0.0
    weight_bytes: int = 0

    @property
    def load_seconds(self) -> float:
        return self.construct_seconds + self.weights_seconds

    def describe(self) -> str:
        if self.verified_bytes:
            verify = (
                f"verified {self.verified_bytes / 1e9:.1f} GB in {self.verify_seconds:.1f} s "
                f"({_rate(self.verified_bytes, self.verify_seconds)}, "
                f"{self.verify_threads} threads)"
            )
        else:
            verify = f"checked file sizes in {self.verify_seconds:.2f} s (hashes skipped)"
        return (
            f"{verify}; built the model in {self.construct_seconds:.1f} s; loaded "
            f"{self.weight_bytes / 1e9:.1f} GB of weights in {self.weights_seconds:.1f} s "
            f"({_rate(self.weight_bytes, self.weights_seconds)})"
        )


def _rate(num_bytes: int, seconds: float) -> str:
    return f"{num_bytes / seconds / 1e9:.1f} GB/s" if seconds > 0 else "- GB/s"


@dataclass(frozen=True)
class EngineInfo:
    path: Path
    manifest: dict
    model_config: ModelConfig
    # Recorded by open_engine and load_engine_model for the start-up report.
    timings: LoadTimings = field(default_factory=LoadTimings, compare=False, repr=False)

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

    @property
    def quant_config(self) -> QuantConfig:
        """The quantisation scheme the engine's weights are stored in."""
        return _quant_section(self.path, self.manifest)

    @property
    def layout(self) -> EngineLayout:
        """How the weights are split over ranks (tp, pp, one file per rank)."""
        return _parallel_section(self.path, self.manifest)

    def rank_file(self, rank: int) -> Path:
        """The weights file global rank `rank` loads."""
        layout = self.layout
        if not 0 <= rank < layout.world_size:
            raise EngineFormatError(
                f"{self.path}: no weights for rank {rank}; the engine has {layout.world_size} "
                f"(tp {layout.tp} × pp {layout.pp})"
            )
        return self.path / layout.rank_files[rank]


def _quant_section(engine_dir: Path, manifest: dict) -> QuantConfig:
    try:
        return quant_config_from_manifest(manifest.get("quant"))
    except ValueError as error:
        raise EngineFormatError(
            f"{engine_dir}: manifest 'quant' section is invalid: {error}"
        ) from None


def _parallel_section(engine_dir: Path, manifest: dict) -> EngineLayout:
    files = manifest.get("files")
    try:
        return EngineLayout.from_manifest(manifest.get("parallel"), set(files or ()))
    except ValueError as error:
        raise EngineFormatError(
            f"{engine_dir}: manifest 'parallel' section is invalid: {error}"
        ) from None


def write_engine(
    output: Path,
    *,
    rank_weights: list[dict[str, torch.Tensor]],
    layout: EngineLayout,
    quant_config: QuantConfig,
    model_config: ModelConfig,
    build: dict,
    source: dict,
    generation_config: dict,
    save_tokenizer: Callable[[Path], None] | None,
    force: bool = False,
    chunk_bytes: int = HASH_CHUNK_BYTES,
) -> Path:
    """Write into a temporary sibling directory, then rename: a failed build leaves nothing
    (one killed outright leaves its directory, which the next build of `output` on the same
    host removes).
    rank_weights[r] is global rank r's tensors, written to layout.rank_files[r]."""
    output = Path(output)
    if len(rank_weights) != layout.world_size:
        raise ValueError(
            f"{len(rank_weights)} ranks of weights for a tp {layout.tp} × pp {layout.pp} layout"
        )
    if output.exists() and not force:
        raise EngineFormatError(f"{output} already exists; pass --force to replace it")
    _remove_stale_staging(output)
    staging = output.parent / f"{_staging_prefix(output)}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for weights, file_name in zip(rank_weights, layout.rank_files):
            save_file(weights, staging / file_name, metadata={"format": "pt"})
            # safetensors writes through a private temp file (0600): give the weights the
            # mode every other engine file gets from the umask.
            os.chmod(staging / file_name, _umask_file_mode())
        if save_tokenizer is not None:
            save_tokenizer(staging / TOKENIZER_DIR)
        files = {}
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                whole, chunks = hash_file(path, chunk_bytes)
                files[path.relative_to(staging).as_posix()] = {
                    "sha256": whole,
                    "bytes": path.stat().st_size,
                    "chunks": {"bytes": chunk_bytes, "sha256": chunks},
                }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kiln_version": __version__,
            "architecture": model_config.architecture,
            "model": model_config.to_dict(),
            "build": build,
            "quant": quant_config.to_manifest(),
            "parallel": layout.to_manifest(),
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


def _staging_prefix(output: Path) -> str:
    """`.NAME.building-HOST-` (+ the building process's pid): the host, because an output
    directory on a shared file system may be written from several machines, and a pid is
    only known to be dead on its own."""
    host = socket.gethostname().replace(os.sep, "_") or "localhost"
    return f".{output.name}.building-{host}-"


def _remove_stale_staging(output: Path) -> None:
    """Remove the staging directories of builds of `output` on this host whose process is
    gone (killed before its cleanup ran: SIGKILL, a crash), saying so on stderr. A directory
    whose process is alive is another build in progress, and one from another host (or named
    otherwise) is not ours to judge: both stay."""
    prefix = _staging_prefix(output)
    if not output.parent.is_dir():
        return
    for path in output.parent.iterdir():
        pid = path.name.removeprefix(prefix)
        if path.name == pid or not pid.isdigit() or not path.is_dir() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            print(f"removed {path.name} left by an interrupted build", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid this system cannot have: keep it)
    return True


def _umask_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_manifest(engine_dir: Path) -> dict:
    """engine.json, bounded in size and nesting before it is parsed and checked against the
    schema (manifest_schema.py) after: EngineFormatError names the first wrong field."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise EngineFormatError(f"{engine_dir}: not a kiln engine (no {MANIFEST})")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise EngineFormatError(f"{path}: {size} bytes is too large for a manifest "
                                f"(limit {MAX_MANIFEST_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
        if json_depth(text) > MAX_JSON_DEPTH:
            raise EngineFormatError(f"{path}: corrupt manifest: nested deeper than {MAX_JSON_DEPTH}")
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise EngineFormatError(f"{path}: corrupt manifest: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineFormatError(f"{path}: not a kiln engine manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise EngineFormatError(f"{path}: format_version is missing")
    if version > FORMAT_VERSION:
        raise EngineFormatError(
            f"{engine_dir}: engine format version {version} is newer than this kiln "
            f"{__version__} reads (up to {FORMAT_VERSION}); upgrade kiln or rebuild the engine"
        )
    try:
        ManifestSchema.model_validate(manifest)
    except ValidationError as error:
        raise EngineFormatError(f"{path}: invalid manifest: {first_problem(error)}") from None
    return manifest


# ---- verification ---------------------------------------------------------------------------

def open_engine(engine_dir: str | Path, *, verify_hashes: bool = True) -> EngineInfo:
    engine_dir = Path(engine_dir)
    started = time.perf_counter()
    manifest = read_manifest(engine_dir)
    verified_bytes, threads = verify_files(engine_dir, manifest, hashes=verify_hashes)
    timings = LoadTimings(
        verify_seconds=time.perf_counter() - started,
        verified_bytes=verified_bytes,
        verify_threads=threads,
    )
    try:
        model_config = ModelConfig.from_dict(manifest["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise EngineFormatError(f"{engine_dir}: manifest 'model' section is invalid: {error}")
    if manifest.get("architecture") != model_config.architecture:
        raise EngineFormatError(f"{engine_dir}: manifest architecture disagrees with its model")
    # Checked now, so a bad section is reported at open, not halfway through loading.
    _quant_section(engine_dir, manifest)
    _parallel_section(engine_dir, manifest)
    return EngineInfo(engine_dir, manifest, model_config, timings)

