"""The engine format: a directory of plain safetensors, a JSON manifest and the tokenizer.

    <engine>/engine.json          manifest (see DESIGN.md "Engine format")
    <engine>/rank0.safetensors    weights: fused, cast, (one file per TP/PP rank later)
    <engine>/tokenizer/           tokenizer.json, tokenizer_config.json, generation_config.json

Loading checks the format version, the architecture and every file's size and sha256, and
says which file is wrong and how. Nothing here unpickles anything.

Each file's manifest entry carries the whole-file sha256 (what older kiln reads) and, since
chunked verification, the sha256 of every HASH_CHUNK_BYTES-long piece:

    "rank0.safetensors": {"sha256": "<whole file>", "bytes": 16060522752,
                          "chunks": {"bytes": 268435456, "sha256": ["<chunk 0>", ...]}}

A whole-file sha256 is one sequential pass (~2 GB/s on one core with SHA instructions: 8 s
for an 8B model); the chunks are checked on every core at once. An engine without "chunks"
(built before them) is checked through the whole-file sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import kiln
from kiln.errors import EngineFormatError
from kiln.models.config import ModelConfig

FORMAT = "kiln-engine"
FORMAT_VERSION = 1
MANIFEST = "engine.json"
TOKENIZER_DIR = "tokenizer"
# The unit of parallel verification: an 8B model's 16 GB is 60 chunks, enough to keep 16
# cores busy, and a manifest line per 256 MiB stays short.
HASH_CHUNK_BYTES = 256 * 2**20
# One read while hashing: big enough that each read and hash update costs far more than the
# call, small enough to stay in cache.
_READ_BYTES = 16 * 2**20
# Each of the two host buffers the weights pass through on their way to the GPU.
_STAGING_BYTES = 64 * 2**20
# More threads than this only queue on the disk and the memory bus.
_MAX_VERIFY_THREADS = 32
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path, chunk_bytes: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def hash_file(path: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> tuple[str, list[str]]:
    """(sha256 of the whole file, sha256 of each chunk_bytes-long piece) in one read pass.
    A second thread feeds the whole-file digest while this one feeds the chunk's (hashlib
    releases the GIL), so with a core to spare the pass takes one hash's time, not two."""
    whole = hashlib.sha256()
    chunk, in_chunk = hashlib.sha256(), 0
    chunks: list[str] = []
    with ThreadPoolExecutor(1) as pool, Path(path).open("rb", buffering=0) as f:
        pending = None
        while piece := f.read(min(_READ_BYTES, chunk_bytes - in_chunk)):
            if pending is not None:
                pending.result()  # in order: the whole-file digest sees pieces one by one
            pending = pool.submit(whole.update, piece)
            chunk.update(piece)
            in_chunk += len(piece)
            if in_chunk == chunk_bytes:
                chunks.append(chunk.hexdigest())
                chunk, in_chunk = hashlib.sha256(), 0
        if pending is not None:
            pending.result()
    if in_chunk:
        chunks.append(chunk.hexdigest())
    return whole.hexdigest(), chunks


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
    # load_engine_model: rank0.safetensors read and copied to the device (synchronised).
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
    chunk_bytes: int = HASH_CHUNK_BYTES,
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


# ---- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileEntry:
    """One checked entry of the manifest's "files"."""

    name: str
    path: Path
    bytes: int
    sha256: str
    chunk_bytes: int | None  # None: an engine built before chunk hashes
    chunk_sha256: tuple[str, ...]


@dataclass(frozen=True)
class _HashJob:
    """One byte range to hash and the digest the manifest records for it."""

    entry: _FileEntry
    chunk: int | None  # chunk index; None: the whole file
    offset: int
    length: int
    sha256: str


def _is_byte_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value) -> bool:
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def _file_entries(engine_dir: Path, manifest: dict) -> list[_FileEntry]:
    """The manifest's "files", checked as untrusted input (RELIABILITY.md): names stay inside
    the engine directory, sizes are byte counts, digests are sha256 hex, and a chunk list
    covers exactly the file's bytes."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise EngineFormatError(f"{engine_dir}: manifest has no 'files' section")
    entries = []
    for name, entry in files.items():

        def invalid(reason: str) -> EngineFormatError:
            return EngineFormatError(
                f"{engine_dir}: manifest entry for file {name} is invalid: {reason}"
            )

        relative = PurePosixPath(name)
        if not name or relative.is_absolute() or ".." in relative.parts:
            raise invalid("the name is not a path inside the engine directory")
        if not isinstance(entry, dict):
            raise invalid("not an object")
        size, digest = entry.get("bytes"), entry.get("sha256")
        if not _is_byte_count(size):
            raise invalid(f"'bytes' is {size!r}, not a byte count")
        if not _is_sha256(digest):
            raise invalid("'sha256' is not a sha256 hex digest")
        chunk_bytes, chunk_sha256 = None, []
        chunks = entry.get("chunks")
        if chunks is not None:
            if not isinstance(chunks, dict):
                raise invalid("'chunks' is not an object")
            chunk_bytes, chunk_sha256 = chunks.get("bytes"), chunks.get("sha256")
            if not _is_byte_count(chunk_bytes) or chunk_bytes == 0:
                raise invalid(f"chunk size {chunk_bytes!r} is not a positive byte count")
            if not isinstance(chunk_sha256, list) or not all(map(_is_sha256, chunk_sha256)):
                raise invalid("'chunks.sha256' is not a list of sha256 hex digests")
            needed = -(-size // chunk_bytes)
            if len(chunk_sha256) != needed:
                raise invalid(
                    f"{len(chunk_sha256)} chunks of {chunk_bytes} bytes do not cover its "
                    f"{size} bytes ({needed} would)"
                )
        entries.append(
            _FileEntry(name, engine_dir / name, size, digest, chunk_bytes, tuple(chunk_sha256))
        )
    return entries


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _hash_range(path: Path, offset: int, length: int, buffer: memoryview) -> str | None:
    """sha256 of bytes [offset, offset + length) of `path`; None if the file ends first."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        remaining = length
        while remaining:
            count = f.readinto(buffer[: min(remaining, len(buffer))])
            if not count:
                return None
            digest.update(buffer[:count])  # releases the GIL: the threads hash in parallel
            remaining -= count
    return digest.hexdigest()


def _check_hash(engine_dir: Path, job: _HashJob, buffers: threading.local) -> None:
    if not hasattr(buffers, "buffer"):
        buffers.buffer = memoryview(bytearray(_READ_BYTES))  # one per thread, reused
    entry = job.entry
    try:
        found = _hash_range(entry.path, job.offset, job.length, buffers.buffer)
    except OSError as error:
        raise EngineFormatError(f"{engine_dir}: cannot read file {entry.name}: {error}") from None
    end = job.offset + job.length
    if found is None:
        raise EngineFormatError(
            f"{engine_dir}: file {entry.name} ended before byte {end} while being verified; "
            f"it changed after the build"
        )
    if found == job.sha256:
        return
    if job.chunk is None:
        raise EngineFormatError(
            f"{engine_dir}: file {entry.name} is corrupt: sha256 {found[:16]}… does not match "
            f"the manifest's {job.sha256[:16]}…; the file changed after the build"
        )
    raise EngineFormatError(
        f"{engine_dir}: file {entry.name} is corrupt in chunk {job.chunk} (bytes {job.offset}–"
        f"{end - 1} of {entry.bytes}): sha256 {found[:16]}… does not match the manifest's "
        f"{job.sha256[:16]}…; the file changed after the build"
    )


def verify_files(
    engine_dir: Path, manifest: dict, *, hashes: bool = True, max_threads: int | None = None
) -> tuple[int, int]:
    """Every file in the manifest exists with its recorded size and, with `hashes`, its sha256:
    chunk by chunk on a thread pool (reads and hashlib release the GIL), or in one piece for an
    engine built before chunk hashes. Raises EngineFormatError naming the file (and the byte
    range) at the first mismatch. Returns (bytes hashed, threads used)."""
    engine_dir = Path(engine_dir)
    entries = _file_entries(engine_dir, manifest)
    for entry in entries:
        if not entry.path.is_file():
            raise EngineFormatError(f"{engine_dir}: file {entry.name} is missing")
        size = entry.path.stat().st_size
        if size != entry.bytes:
            raise EngineFormatError(
                f"{engine_dir}: file {entry.name} has {size} bytes, the manifest says {entry.bytes}"
            )
    if not hashes:
        return 0, 0
    jobs = []
    for entry in entries:
        if entry.chunk_bytes is None:
            jobs.append(_HashJob(entry, None, 0, entry.bytes, entry.sha256))
            continue
        for index, digest in enumerate(entry.chunk_sha256):
            offset = index * entry.chunk_bytes
            length = min(entry.chunk_bytes, entry.bytes - offset)
            jobs.append(_HashJob(entry, index, offset, length, digest))
    if not jobs:
        return 0, 0
    # Longest first, so that a whole-file job (older engines) does not start last and run alone.
    jobs.sort(key=lambda job: -job.length)
    threads = max(1, min(len(jobs), max_threads or _usable_cpus(), _MAX_VERIFY_THREADS))
    buffers = threading.local()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="kiln-verify")
    try:
        futures = [pool.submit(_check_hash, engine_dir, job, buffers) for job in jobs]
        for future in as_completed(futures):
            future.result()  # the first mismatch raises; the jobs not started are cancelled
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sum(job.length for job in jobs), threads


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
    return EngineInfo(engine_dir, manifest, model_config, timings)


# ---- loading --------------------------------------------------------------------------------


def _check_tensors(engine: EngineInfo, file, expected: dict[str, torch.Tensor]) -> None:
    """The file holds exactly the model's tensors, each in the model's shape (checked before
    anything is copied)."""
    names = set(file.keys())
    if names != set(expected):
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        raise EngineFormatError(
            f"{engine.path}: rank0.safetensors does not match {engine.model_config.architecture}"
            f" (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, param in expected.items():
        shape = list(file.get_slice(name).get_shape())
        if shape != list(param.shape):
            raise EngineFormatError(
                f"{engine.path}: tensor {name} in rank0.safetensors has shape {shape}; "
                f"{engine.model_config.architecture} with this config needs {list(param.shape)}"
            )


def _stage_to_device(
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: torch.device,
    staging_bytes: int = _STAGING_BYTES,
) -> dict[str, torch.Tensor]:
    """Host tensors (here: views of the memory-mapped file) copied to `device` through two
    reusable host buffers, pinned on CUDA. While the GPU copies one buffer, the CPU fills the
    other from the page cache (torch's copy uses every intra-op thread), so the transfer runs
    at about the slower of host memcpy and the PCIe link instead of a pageable
    tensor.to("cuda"), which the driver bounces through its own small pinned buffer one
    synchronous piece at a time. On the CPU the same path is two plain copies (for tests)."""
    cuda = device.type == "cuda"
    buffers = [torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]  # when the GPU finished reading each
    turn = 0
    out: dict[str, torch.Tensor] = {}
    for name, host in tensors:
        target = torch.empty(host.shape, dtype=host.dtype, device=device)
        out[name] = target
        source = host.reshape(-1).view(torch.uint8)  # (nbytes,)
        destination = target.view(-1).view(torch.uint8)  # (nbytes,)
        for start in range(0, source.numel(), staging_bytes):
            stop = min(start + staging_bytes, source.numel())
            buffer = buffers[turn][: stop - start]
            if copied[turn] is not None:
                copied[turn].synchronize()
            buffer.copy_(source[start:stop])
            destination[start:stop].copy_(buffer, non_blocking=cuda)
            if cuda:
                copied[turn] = torch.cuda.Event()
                copied[turn].record(torch.cuda.current_stream(device))
            turn ^= 1
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    return out


def load_engine_model(
    engine: EngineInfo, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The model with the engine's weights on `device`, in `dtype` (default: the engine's).

    The model is built on the meta device (no memory, no init), its tensors are checked
    against the file's header, and the weights go from the file to `device` once and are
    assigned as the parameters: no CPU copy of the model, no float32 intermediate. On CUDA
    they travel through pinned staging buffers (_stage_to_device); on the CPU the parameters
    are views of the memory-mapped file. Records its seconds on `engine.timings`."""
    from kiln.models.registry import get_model_class

    device = torch.device(device)
    started = time.perf_counter()
    model_class = get_model_class(engine.model_config.architecture)
    with torch.device("meta"):
        model = model_class(engine.model_config)
    constructed = time.perf_counter()
    path = engine.path / "rank0.safetensors"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            _check_tensors(engine, file, model.engine_state_dict())
            tensors = ((name, file.get_tensor(name)) for name in file.keys())
            if device.type == "cuda":
                with torch.cuda.device(device):
                    weights = _stage_to_device(tensors, device)
            else:
                weights = dict(tensors)
    except SafetensorError as error:
        raise EngineFormatError(f"{path}: not a readable safetensors file: {error}") from None
    if dtype is not None and dtype != engine.dtype:
        weights = {
            name: tensor.to(dtype) if tensor.is_floating_point() else tensor
            for name, tensor in weights.items()
        }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loaded = time.perf_counter()
    model.load_state_dict(weights, strict=False, assign=True)
    # Derived buffers (RoPE tables) were computed on the CPU at construction.
    model = model.to(device).eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    finished = time.perf_counter()
    engine.timings.construct_seconds = (constructed - started) + (finished - loaded)
    engine.timings.weights_seconds = loaded - constructed
    engine.timings.weight_bytes = path.stat().st_size
    return model
