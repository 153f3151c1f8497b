"""Editing a built engine's files in tests: read and write its manifest, and re-record the
files' sizes and hashes after a test changed them (so only what the test means to break is
broken)."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.compiler.verify import hash_file


def manifest_of(engine_dir: Path) -> dict:
    return json.loads((engine_dir / "engine.json").read_text())


def write_manifest(engine_dir: Path, manifest: dict) -> None:
    (engine_dir / "engine.json").write_text(json.dumps(manifest))


def rehash(engine_dir: Path, chunk_bytes: int) -> None:
    """Record every file's current bytes in the manifest, as a build with this chunk size would."""
    manifest = manifest_of(engine_dir)
    for name, entry in manifest["files"].items():
        whole, chunks = hash_file(engine_dir / name, chunk_bytes)
        entry.update(sha256=whole, bytes=(engine_dir / name).stat().st_size,
                     chunks={"bytes": chunk_bytes, "sha256": chunks})
    write_manifest(engine_dir, manifest)
