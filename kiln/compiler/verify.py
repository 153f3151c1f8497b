"""Engine file verification: every file the manifest lists exists with its recorded size
and sha256, checked chunk by chunk on every core.

Each file's manifest entry carries the whole-file sha256 (what older kiln reads) and, since
chunked verification, the sha256 of every HASH_CHUNK_BYTES-long piece:

    "rank0.safetensors": {"sha256": "<whole file>", "bytes": 16060522752,
                          "chunks": {"bytes": 268435456, "sha256": ["<chunk 0>", ...]}}

A whole-file sha256 is one sequential pass (~2 GB/s on one core with SHA instructions: 8 s
for an 8B model); the chunks are checked on every core at once. An engine without "chunks"
(built before them) is checked through the whole-file sha256. The manifest is untrusted
input here (RELIABILITY.md): names, sizes and digests are checked before they are used.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kiln.errors import EngineFormatError

# The unit of parallel verification: an 8B model's 16 GB is 60 chunks, enough to keep 16
# cores busy, and a manifest line per 256 MiB stays short.
HASH_CHUNK_BYTES = 256 * 2**20
# One read while hashing: big enough that each read and hash update costs far more than the
# call, small enough to stay in cache.
_READ_BYTES = 16 * 2**20
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

