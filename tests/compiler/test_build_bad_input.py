"""More bad input to `kiln build`, each refused in one line with no engine left behind:
inf / NaN in a weight kiln quantises, flags `--quant keep` would ignore, and the staging
directories of builds killed before their cleanup ran (removed by the next build of that
output unless their process is alive); SIGTERM runs a build's cleanup."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file

import kiln.compiler.manifest as manifest
from kiln.cli import main
from kiln.config import BuildConfig, validated
from kiln.errors import KilnError
from kiln.quant.quantize import (
    NonFiniteWeightError, fp8_channel_scales, int4_grid, int8_scales,
)
from tests.checkpoint.test_gguf import write_tiny_gguf
from tests.compiler.test_build_errors import (
    assert_nothing_left, assert_one_line_error, build, copy_model,
)
from tests.helpers import save_tiny_hf_model, tiny_llama_config

# Above Linux's largest pid_max (2^22): no process can have it.
NO_SUCH_PID = 2**22 + 1
HOST = socket.gethostname()
STAGING = f".engine.building-{HOST}-"  # + pid: write_engine's staging directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "model"
    save_tiny_hf_model(tiny_llama_config(max_position_embeddings=64), directory)
    return directory


# ─── inf / NaN in a weight kiln quantises ──────────────────────────────────────────────


def test_scale_functions_name_the_first_non_finite_row():
    weight = torch.randn(8, 64)
    weight[5, 3] = float("inf")
    weight[6, 0] = float("nan")
    for compute in (fp8_channel_scales, lambda w: int8_scales(w, 16),
                    lambda w: int4_grid(w, 16, zero_point=True),
                    lambda w: int4_grid(w, 16, zero_point=False)):
        with pytest.raises(NonFiniteWeightError, match=r"non-finite values \(row 5\)"):
            compute(weight)
    assert torch.isfinite(int8_scales(weight[:5], 16)).all()  # finite rows quantise


@pytest.mark.parametrize("scheme", ["fp8", "int8-wo", "int4-wo"])
@pytest.mark.parametrize("tensor, row, value", [
    ("model.layers.0.mlp.down_proj.weight", 5, float("inf")),
    # Fused layers: the row is named in the checkpoint tensor it came from.
    ("model.layers.1.self_attn.k_proj.weight", 3, float("nan")),
    ("model.layers.0.mlp.up_proj.weight", 2, float("-inf")),
])
def test_non_finite_weight_is_refused_naming_the_tensor_and_row(
        hf_dir, tmp_path, capsys, scheme, tensor, row, value):
    model = copy_model(hf_dir, tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    weights[tensor][row, 7] = value
    save_file(weights, model / "model.safetensors")
    code, err = build(capsys, model, "-o", tmp_path / "engine", "--dtype", "float32",
                      "--quant", scheme, *(["--group-size", "16"] if scheme == "int4-wo" else []))
    assert_one_line_error(code, err, f"{tensor} has non-finite values (row {row}); kiln "
                          "cannot quantise it")
    assert_nothing_left(tmp_path, "engine")


@pytest.mark.parametrize("scheme", ["fp8", "int4-wo"])
@pytest.mark.parametrize("tensor, row", [
    ("model.layers.0.mlp.up_proj.weight", 40),  # rank 1's half of the fused gate|up
    ("model.layers.1.self_attn.q_proj.weight", 20),  # rank 1's head of q|k|v
    ("model.layers.1.mlp.down_proj.weight", 5),  # row-parallel: columns split, rows whole
])
def test_non_finite_weight_in_a_sharded_build_names_the_tensor_and_row(
        hf_dir, tmp_path, capsys, scheme, tensor, row):
    """--tp 2: each rank quantises its slice, so the row it finds is the slice's; the
    message still names the checkpoint tensor and its row there."""
    model = copy_model(hf_dir, tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    weights[tensor][row, 30] = float("nan")
    save_file(weights, model / "model.safetensors")
    code, err = build(capsys, model, "-o", tmp_path / "engine", "--dtype", "float32",
                      "--quant", scheme, "--tp", "2",
                      *(["--group-size", "16"] if scheme == "int4-wo" else []))
    assert_one_line_error(code, err, f"{tensor} has non-finite values (row {row}); kiln "
                          "cannot quantise it")
    assert_nothing_left(tmp_path, "engine")


# ─── flags --quant keep would ignore ───────────────────────────────────────────────────


@pytest.mark.parametrize("flags, message", [
    ({"group_size": 64}, "--group-size: --quant keep uses the checkpoint's own groups; drop "
     "the flag"),
    ({"quant_lm_head": True}, "--quant-lm-head: --quant keep keeps the LM head the checkpoint "
     "stores; drop the flag"),
    ({"act_scales": "dynamic"}, "--act-scales: --quant keep keeps the checkpoint's own "
     "activation scales; drop the flag"),
    ({"act_scales": "static", "calibration": "sharegpt", "kv_cache_dtype": "fp8"},
     "--act-scales: --quant keep"),
    ({"calibration": "sharegpt"}, "--calibration with --quant keep only calibrates the FP8 KV "
     "cache: add --kv-cache-dtype fp8 or drop it"),
])
def test_keep_refuses_flags_it_would_ignore(flags, message):
    with pytest.raises(KilnError, match="invalid BuildConfig") as error:
        validated(BuildConfig, quant="keep", **flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_keep_flags_still_fine():
    validated(BuildConfig, quant="keep", calibration="sharegpt", kv_cache_dtype="fp8")
    validated(BuildConfig, quant="int4-wo", group_size=64, quant_lm_head=True)


def test_keep_group_size_refused_from_the_cli(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    write_tiny_gguf(path, qtype=Q.Q8_0, hidden=64, inter=128, heads=4, kv_heads=2)
    code, err = build(capsys, path, "-o", tmp_path / "engine", "--quant", "keep",
                      "--group-size", "32")
    assert_one_line_error(code, err, "--group-size: --quant keep uses the checkpoint's own "
                          "groups; drop the flag")
    assert_nothing_left(tmp_path, "engine")


def test_keep_with_kv_calibration_records_no_awq(tmp_path, capsys):
    """Calibration of a pre-quantised int4 checkpoint measures the KV cache only: the
    manifest's quant section stays the checkpoint's (no AWQ claimed for its weights)."""
    path = tmp_path / "model.gguf"
    write_tiny_gguf(path, qtype=Q.Q4_0, hidden=64, inter=128, heads=4, kv_heads=2, layers=2)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"hello world {i} the quick brown fox" for i in range(400)))
    code, err = build(capsys, path, "-o", tmp_path / "engine", "--dtype", "float32",
                      "--quant", "keep", "--kv-cache-dtype", "fp8", "--calibration", text,
                      "--calibration-samples", "8")
    assert code == 0, err
    written = json.loads((tmp_path / "engine" / "engine.json").read_text())
    assert written["quant"]["scheme"] == "int4-wo" and written["quant"]["prequantized"]
    assert not written["quant"].get("awq")
    assert written["build"]["kv_scales"]["calibrated"] is True


# ─── staging directories of killed builds ──────────────────────────────────────────────


def test_stale_staging_of_a_dead_build_is_removed(hf_dir, tmp_path, capsys):
    dead = tmp_path / f"{STAGING}{NO_SUCH_PID}"
    alive = tmp_path / f"{STAGING}{os.getppid()}"  # the test runner's parent
    other = tmp_path / f".other.building-{HOST}-{NO_SUCH_PID}"  # another output's
    for directory in (dead, alive, other):
        (directory / "tokenizer").mkdir(parents=True)
        (directory / "rank0.safetensors").write_bytes(b"partial")
    code, err = build(capsys, hf_dir, "-o", tmp_path / "engine", "--dtype", "float32")
    assert code == 0, err
    assert f"removed {STAGING}{NO_SUCH_PID} left by an interrupted build" in err
    assert not dead.exists() and alive.is_dir() and other.is_dir()
    assert (tmp_path / "engine" / "engine.json").is_file()


def test_stale_staging_of_a_live_process_stays(tmp_path, capsys):
    mine = tmp_path / f"{STAGING}{os.getpid()}"
    dead = tmp_path / f"{STAGING}{NO_SUCH_PID}"
    not_a_pid = tmp_path / f"{STAGING}x12"
    # Another machine's build on a shared file system: its pid means nothing here.
    other_host = tmp_path / f".engine.building-{HOST}x-{NO_SUCH_PID}"
    old_style = tmp_path / f".engine.building-{NO_SUCH_PID}"  # no host: not ours to judge
    for directory in (mine, dead, not_a_pid, other_host, old_style):
        directory.mkdir()
    manifest._remove_stale_staging(tmp_path / "engine")
    assert mine.is_dir() and not_a_pid.is_dir() and not dead.exists()
    assert other_host.is_dir() and old_style.is_dir()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"removed {STAGING}{NO_SUCH_PID} left by an interrupted build"]


def test_sigterm_during_a_build_leaves_no_staging(hf_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM mid-write (while hashing the engine files) unwinds through write_engine's
    cleanup: exit status 143, no engine, no staging directory, the handler restored."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    hash_file = manifest.hash_file

    def terminated_while_hashing(*args, **kwargs):
        # Without kiln's handler the signal would end the test run: fail instead.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)
        return hash_file(*args, **kwargs)

    monkeypatch.setattr(manifest, "hash_file", terminated_while_hashing)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["build", str(hf_dir), "-o", str(tmp_path / "engine"), "--dtype", "float32"])
        assert exit_.value.code == 143
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert_nothing_left(tmp_path, "engine")
