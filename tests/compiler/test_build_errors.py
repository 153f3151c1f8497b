"""Bad input to `kiln build` / `kiln inspect`: one clear line naming the problem, a non-zero
exit, no traceback, and no partial engine left behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from kiln.compiler.manifest import FORMAT_VERSION
from kiln.cli import main
from tests.helpers import save_tiny_hf_model, tiny_llama_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "model"
    save_tiny_hf_model(tiny_llama_config(max_position_embeddings=64), directory)
    return directory


def copy_model(source: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    for path in source.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def build(capsys, *args) -> tuple[int, str]:
    code = main(["build", *map(str, args)])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    # The progress bar may have drawn on stderr before the failure; the error is one line.
    lines = [line for line in err.splitlines()
             if line.strip() and not re.search(r"converting( rank \d+)?:", line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("kiln: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_left(parent: Path, name: str) -> None:
    leftovers = [p.name for p in parent.iterdir() if name in p.name]
    assert leftovers == [], leftovers


def test_good_build_then_inspect(hf_dir, tmp_path, capsys):
    code, err = build(capsys, hf_dir, "-o", tmp_path / "engine", "--dtype", "float32")
    assert code == 0, err
    assert main(["inspect", str(tmp_path / "engine")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "all sha256 verified" in out


def test_missing_config(hf_dir, tmp_path, capsys):
    model = copy_model(hf_dir, tmp_path / "m")
    (model / "config.json").unlink()
    assert_one_line_error(*build(capsys, model, "-o", tmp_path / "e"), "config.json not found")
    assert_nothing_left(tmp_path, "e")


def test_malformed_config(hf_dir, tmp_path, capsys):
    model = copy_model(hf_dir, tmp_path / "m")
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    assert_one_line_error(*build(capsys, model, "-o", tmp_path / "e"), "not valid JSON")


def test_config_missing_field(hf_dir, tmp_path, capsys):
    model = copy_model(hf_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    del config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*build(capsys, model, "-o", tmp_path / "e"), "hidden_size")


def test_unknown_architecture_lists_supported(hf_dir, tmp_path, capsys):
    model = copy_model(hf_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    assert_one_line_error(
        *build(capsys, model, "-o", tmp_path / "e"),
        "FalconForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel",
    )


def test_missing_tensor_named(hf_dir, tmp_path, capsys):
    model = copy_model(hf_dir, tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, model / "model.safetensors")
    assert_one_line_error(
        *build(capsys, model, "-o", tmp_path / "e"), "model.layers.1.mlp.up_proj.weight", "missing"
    )
    assert_nothing_left(tmp_path, "e")


def test_shape_mismatch_names_tensor_and_shapes(hf_dir, tmp_path, capsys):
    model = copy_model(hf_dir, tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = weights["model.layers.0.self_attn.k_proj.weight"][:8]
    save_file(weights, model / "model.safetensors")
    assert_one_line_error(
        *build(capsys, model, "-o", tmp_path / "e"),
        "model.layers.0.self_attn.k_proj.weight", "(8, 32)", "(16, 32)",
    )


@pytest.mark.parametrize("keep_bytes", [4, 100, -64])
def test_truncated_safetensors(hf_dir, tmp_path, capsys, keep_bytes):
    model = copy_model(hf_dir, tmp_path / "m")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:keep_bytes])
    assert_one_line_error(*build(capsys, model, "-o", tmp_path / "e"), "model.safetensors", "truncated")
    assert_nothing_left(tmp_path, "e")


def test_output_exists_refused_unless_force(hf_dir, tmp_path, capsys):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    assert_one_line_error(*build(capsys, hf_dir, "-o", tmp_path / "e"), "already exists", "--force")
    assert (tmp_path / "e" / "keep.txt").read_text() == "mine"
    code, err = build(capsys, hf_dir, "-o", tmp_path / "e", "--force", "--dtype", "float32")
    assert code == 0, err
    assert (tmp_path / "e" / "engine.json").is_file() and not (tmp_path / "e" / "keep.txt").exists()


def test_bad_dtype_and_max_len(hf_dir, tmp_path, capsys):
    assert_one_line_error(*build(capsys, hf_dir, "-o", tmp_path / "e", "--dtype", "int3"), "dtype")
    assert_one_line_error(
        *build(capsys, hf_dir, "-o", tmp_path / "e", "--max-model-len", "100000"),
        "100000", "max_position_embeddings",
    )


@pytest.fixture
def engine(hf_dir, tmp_path, capsys) -> Path:
    code, err = build(capsys, hf_dir, "-o", tmp_path / "engine", "--dtype", "float32")
    assert code == 0, err
    return tmp_path / "engine"


def test_changed_engine_bytes_name_the_file(engine, capsys):
    path = engine / "rank0.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    code = main(["inspect", str(engine)])
    assert_one_line_error(code, capsys.readouterr().err, "rank0.safetensors", "sha256")


def test_truncated_engine_file(engine, capsys):
    path = engine / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    code = main(["inspect", str(engine)])
    assert_one_line_error(code, capsys.readouterr().err, "rank0.safetensors", "bytes")


def test_newer_engine_format_refused(engine, capsys):
    manifest = json.loads((engine / "engine.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (engine / "engine.json").write_text(json.dumps(manifest))
    code = main(["inspect", str(engine)])
    assert_one_line_error(code, capsys.readouterr().err, "newer", "upgrade kiln")


def test_not_an_engine(tmp_path, capsys):
    code = main(["inspect", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "not a kiln engine")


def test_cli_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "build", str(tmp_path / "nope"), "-o", str(tmp_path / "e")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("kiln: error:") and "Traceback" not in result.stderr


def test_auto_map_code_is_never_run(hf_dir, tmp_path, capsys):
    """RELIABILITY.md: a checkpoint's auto_map must not run code (no canary file)."""
    model = copy_model(hf_dir, tmp_path / "m")
    canary = tmp_path / "canary"
    (model / "evil.py").write_text(f"open({str(canary)!r}, 'w').write('pwned')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (model / "config.json").write_text(json.dumps(config))
    code, err = build(capsys, model, "-o", tmp_path / "e", "--dtype", "float32")
    assert code == 0, err
    assert not canary.exists()
