"""engine.json is checked against a schema before it is used (issue 15, defect 5): each
malformed manifest the probe tried gets one line naming the field, never a traceback, and a
deeply nested or oversized file is refused before it is parsed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.compiler.manifest import open_engine
from kiln.compiler.manifest_schema import MAX_JSON_DEPTH, json_depth
from kiln.errors import EngineFormatError
from tests.compiler.engine_files import manifest_of
from tests.helpers import build_tiny_engine


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_engine(tmp_path_factory.mktemp("schema"), max_position_embeddings=64)


def with_manifest(built: Path, tmp_path: Path, text: str) -> Path:
    """A copy of the engine (weights linked) whose engine.json is `text`."""
    engine = tmp_path / "engine"
    engine.mkdir()
    for path in built.iterdir():
        if path.name != "engine.json":
            (engine / path.name).symlink_to(path)
    (engine / "engine.json").write_text(text)
    return engine


def edited(manifest: dict, path: str, value) -> dict:
    manifest = json.loads(json.dumps(manifest))
    *parents, last = path.split(".")
    target = manifest
    for part in parents:
        target = target[part]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return manifest


DELETE = object()
CASES = [
    ("missing build", "build", DELETE, "'build'"),
    ("bogus dtype", "build.dtype", "bogus", "'build.dtype'"),
    ("dtype that is a torch attribute", "build.dtype", "save", "'build.dtype'"),
    ("negative max_model_len", "build.max_model_len", -5, "'build.max_model_len'"),
    ("max_model_len as text", "build.max_model_len", "1024", "'build.max_model_len'"),
    ("vocab_size as text", "model.vocab_size", "lots", "'model.vocab_size'"),
    ("zero layers", "model.num_layers", 0, "'model.num_layers'"),
    ("bool as a count", "model.num_heads", True, "'model.num_heads'"),
    ("NaN eps", "model.norm_eps", float("nan"), "'model.norm_eps'"),
    ("files not an object", "files", [1, 2], "'files'"),
    ("quant not an object", "quant", "int4", "'quant'"),
    ("missing model", "model", DELETE, "'model'"),
]


@pytest.mark.parametrize("path,value,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_manifest_gets_one_line_naming_the_field(built, tmp_path, path, value, words):
    engine = with_manifest(built, tmp_path, json.dumps(edited(manifest_of(built), path, value)))
    with pytest.raises(EngineFormatError) as raised:
        open_engine(engine)
    message = str(raised.value)
    assert words in message and "\n" not in message, message


def test_deep_nesting_is_refused_before_parsing(built, tmp_path):
    manifest = manifest_of(built)
    text = json.dumps(manifest)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    engine = with_manifest(built, tmp_path, text)
    with pytest.raises(EngineFormatError, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        open_engine(engine)


def test_oversized_manifest_is_refused(built, tmp_path):
    text = json.dumps(manifest_of(built))[:-1] + ', "pad": "' + "x" * (17 << 20) + '"}'
    with pytest.raises(EngineFormatError, match="too large for a manifest"):
        open_engine(with_manifest(built, tmp_path, text))


def test_json_depth_skips_brackets_in_strings():
    assert json_depth('{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth('"\\"[["') == 0


def test_the_cli_says_one_line(built, tmp_path):
    import subprocess
    import sys

    engine = with_manifest(built, tmp_path, json.dumps(edited(manifest_of(built), "build.dtype", "bogus")))
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", str(engine), "--prompt", "hi",
                             "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "'build.dtype'" in result.stderr, result.stderr[-1500:]
