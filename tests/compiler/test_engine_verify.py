"""Engine files are verified chunk by chunk on a thread pool (engine.json keeps the
whole-file sha256 too, and engines without chunk hashes still verify); the manifest's sizes
and counts are untrusted input; load_engine_model checks the file against the model before
copying anything, and both record their timings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kiln.compiler.verify as verify_module
from kiln.compiler.loader import _stage_to_device, load_engine_model
from kiln.compiler.manifest import LoadTimings, open_engine
from kiln.compiler.verify import HASH_CHUNK_BYTES, hash_file, sha256_file, verify_files
from kiln.cli import main
from kiln.errors import EngineFormatError
from tests.compiler.engine_files import manifest_of, rehash, write_manifest
from tests.helpers import build_tiny_engine

SMALL_CHUNK = 4096


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_engine(tmp_path_factory.mktemp("verify"), max_position_embeddings=64)


@pytest.fixture
def engine(built, tmp_path) -> Path:
    """A fresh copy of the built engine, re-hashed in 4 KiB chunks so the weights file has
    many (as a 16 GB file has 60 of 256 MiB)."""
    copy = tmp_path / "engine"
    for path in built.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(built)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    rehash(copy, SMALL_CHUNK)
    return copy


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---- build: what the manifest records --------------------------------------------------------


def test_build_records_whole_file_and_chunk_hashes(built):
    files = manifest_of(built)["files"]
    assert "rank0.safetensors" in files
    for name, entry in files.items():
        path = built / name
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path)  # what older kiln reads
        assert entry["chunks"]["bytes"] == HASH_CHUNK_BYTES
        # Smaller than one chunk: the one chunk is the whole file.
        assert entry["chunks"]["sha256"] == [entry["sha256"]]


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 99, 100, 101])
@pytest.mark.parametrize("read_bytes", [3, 7, 10, 1 << 20])
def test_hash_file_one_pass_matches_separate_hashes(tmp_path, monkeypatch, size, read_bytes):
    # Reads that straddle chunk boundaries, end on them, or hold whole chunks.
    monkeypatch.setattr(verify_module, "_READ_BYTES", read_bytes)
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    path = tmp_path / "f"
    path.write_bytes(data)
    whole, chunks = hash_file(path, chunk_bytes=10)
    assert whole == hashlib.sha256(data).hexdigest()
    assert chunks == [hashlib.sha256(data[i : i + 10]).hexdigest() for i in range(0, size, 10)]


# ---- verification ---------------------------------------------------------------------------


def test_chunked_engine_verifies_in_parallel(engine):
    manifest = manifest_of(engine)
    size = (engine / "rank0.safetensors").stat().st_size
    assert len(manifest["files"]["rank0.safetensors"]["chunks"]["sha256"]) == -(-size // SMALL_CHUNK) > 4
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    assert verify_files(engine, manifest, max_threads=4) == (total, 4)
    info = open_engine(engine)
    assert info.timings.verified_bytes == total and info.timings.verify_seconds > 0
    assert info.timings.verify_threads >= 1


def test_corrupt_byte_in_a_middle_chunk_is_named(engine):
    path = engine / "rank0.safetensors"
    offset = 5 * SMALL_CHUNK + 123
    flip_byte(path, offset)
    with pytest.raises(EngineFormatError) as error:
        open_engine(engine)
    message = str(error.value)
    assert "\n" not in message
    size = path.stat().st_size
    assert "rank0.safetensors is corrupt in chunk 5" in message
    assert f"bytes {5 * SMALL_CHUNK}–{6 * SMALL_CHUNK - 1} of {size}" in message


def test_corrupt_chunk_through_the_cli_is_one_line(engine, capsys):
    flip_byte(engine / "rank0.safetensors", 3 * SMALL_CHUNK)
    assert main(["inspect", str(engine)]) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kiln: error: ") and "Traceback" not in err
    assert "rank0.safetensors" in lines[0] and "chunk 3" in lines[0] and "sha256" in lines[0]


def test_corrupt_last_partial_chunk_is_named(engine):
    path = engine / "rank0.safetensors"
    size = path.stat().st_size
    assert size % SMALL_CHUNK  # the last chunk is partial
    flip_byte(path, size - 1)
    last = (size - 1) // SMALL_CHUNK
    with pytest.raises(EngineFormatError, match=f"chunk {last} \\(bytes {last * SMALL_CHUNK}–{size - 1} "):
        open_engine(engine)


def test_truncated_file_is_caught_before_hashing(engine):
    path = engine / "rank0.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - SMALL_CHUNK])
    with pytest.raises(EngineFormatError, match=f"rank0.safetensors has {size - SMALL_CHUNK} bytes, "
                                                f"the manifest says {size}"):
        open_engine(engine, verify_hashes=False)


def test_hash_range_reports_a_file_that_shrank(engine):
    buffer = memoryview(bytearray(64))
    path = engine / "rank0.safetensors"
    size = path.stat().st_size
    assert verify_module._hash_range(path, size - 10, 20, buffer) is None
    assert verify_module._hash_range(path, 0, 100, buffer) == hashlib.sha256(path.read_bytes()[:100]).hexdigest()


def test_engine_without_chunk_hashes_still_verifies(engine):
    """An engine built before chunk hashes: the whole-file sha256 is checked."""
    manifest = manifest_of(engine)
    for entry in manifest["files"].values():
        del entry["chunks"]
    write_manifest(engine, manifest)
    info = open_engine(engine)
    assert info.timings.verified_bytes == sum(e["bytes"] for e in manifest["files"].values())
    flip_byte(engine / "rank0.safetensors", 5 * SMALL_CHUNK)
    with pytest.raises(EngineFormatError, match="rank0.safetensors is corrupt: sha256 .* does not "
                                                "match the manifest's"):
        open_engine(engine)


def test_skipping_hashes_checks_sizes_only(engine):
    flip_byte(engine / "rank0.safetensors", 5 * SMALL_CHUNK)
    info = open_engine(engine, verify_hashes=False)
    assert info.timings.verified_bytes == 0


def chunk_entry(engine: Path) -> tuple[dict, dict]:
    manifest = manifest_of(engine)
    return manifest, manifest["files"]["rank0.safetensors"]


@pytest.mark.parametrize("change, needle", [
    (lambda c: c["sha256"].pop(), "chunks of 4096 bytes do not cover its"),
    (lambda c: c["sha256"].append(c["sha256"][0]), "chunks of 4096 bytes do not cover its"),
    (lambda c: c.update(sha256=[]), "0 chunks of 4096 bytes do not cover its"),
    (lambda c: c.update(bytes=8192), "chunks of 8192 bytes do not cover its"),
    (lambda c: c.update(bytes=0), "chunk size 0 is not a positive byte count"),
    (lambda c: c.update(bytes=-4096), "chunk size -4096 is not"),
    (lambda c: c.update(bytes=True), "chunk size True is not"),
    (lambda c: c.update(bytes="4096"), "chunk size '4096' is not"),
    (lambda c: c.update(bytes=4096.0), "chunk size 4096.0 is not"),
    (lambda c: c.update(sha256="0" * 64), "'chunks.sha256' is not a list of sha256 hex digests"),
    (lambda c: c["sha256"].__setitem__(2, "xyz"), "not a list of sha256 hex digests"),
    (lambda c: c["sha256"].__setitem__(2, None), "not a list of sha256 hex digests"),
    (lambda c: c["sha256"].__setitem__(2, c["sha256"][2].upper() + "0"), "not a list of sha256"),
])
def test_chunk_lists_that_do_not_add_up_are_rejected(engine, change, needle):
    manifest, entry = chunk_entry(engine)
    change(entry["chunks"])
    write_manifest(engine, manifest)
    for verify_hashes in (True, False):  # a structural check: before any file is read
        with pytest.raises(EngineFormatError) as error:
            open_engine(engine, verify_hashes=verify_hashes)
        message = str(error.value)
        assert "manifest entry for file rank0.safetensors is invalid" in message, message
        assert needle in message, message


@pytest.mark.parametrize("change, needle", [
    (lambda e: e.update(chunks=[1, 2]), "'chunks' is not an object"),
    (lambda e: e.update(bytes=-1), "'bytes' is -1, not a byte count"),
    (lambda e: e.update(bytes=None), "'bytes' is None"),
    (lambda e: e.update(bytes=1e30), "'bytes' is 1e+30"),
    (lambda e: e.update(sha256="abc"), "'sha256' is not a sha256 hex digest"),
    (lambda e: e.pop("sha256"), "'sha256' is not a sha256 hex digest"),
])
def test_malformed_file_entries_are_rejected(engine, change, needle):
    manifest, entry = chunk_entry(engine)
    change(entry)
    write_manifest(engine, manifest)
    with pytest.raises(EngineFormatError, match="manifest entry for file rank0.safetensors is invalid") as error:
        open_engine(engine)
    assert needle in str(error.value)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "tokenizer/../../x", ""])
def test_file_names_outside_the_engine_are_rejected(engine, name):
    manifest = manifest_of(engine)
    manifest["files"][name] = dict(manifest["files"]["rank0.safetensors"])
    write_manifest(engine, manifest)
    with pytest.raises(EngineFormatError, match="not a path inside the engine directory"):
        open_engine(engine, verify_hashes=False)


@pytest.mark.parametrize("files", [None, [], "rank0.safetensors"])
def test_missing_files_section(engine, files):
    manifest = manifest_of(engine)
    manifest["files"] = files
    write_manifest(engine, manifest)
    with pytest.raises(EngineFormatError, match="invalid manifest: field 'files'"):
        open_engine(engine)


# ---- loading --------------------------------------------------------------------------------


def test_load_records_timings_and_matches_the_file(engine):
    info = open_engine(engine)
    model = load_engine_model(info)
    stored = load_file(engine / "rank0.safetensors")
    params = dict(model.engine_state_dict())
    assert set(params) == set(stored)
    for name, tensor in stored.items():
        assert torch.equal(params[name], tensor), name
    timings = info.timings
    assert timings.weight_bytes == (engine / "rank0.safetensors").stat().st_size
    assert timings.construct_seconds > 0 and timings.weights_seconds > 0
    assert timings.load_seconds == timings.construct_seconds + timings.weights_seconds
    assert "verified" in timings.describe() and "GB/s" in timings.describe()


def test_load_converts_dtype(engine):
    model = load_engine_model(open_engine(engine), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_shape_mismatch_named_before_copying(engine):
    path = engine / "rank0.safetensors"
    tensors = load_file(path)
    name = "model.embed_tokens.weight"
    tensors[name] = tensors[name].reshape(32, 64).contiguous()  # (64, 32) in the model
    save_file(tensors, path, metadata={"format": "pt"})
    rehash(engine, SMALL_CHUNK)
    with pytest.raises(EngineFormatError, match=f"tensor {name} in rank0.safetensors has shape "
                                                r"\[32, 64\]; LlamaForCausalLM with this config "
                                                r"needs \[64, 32\]"):
        load_engine_model(open_engine(engine))


def test_missing_tensor_named(engine):
    path = engine / "rank0.safetensors"
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    rehash(engine, SMALL_CHUNK)
    with pytest.raises(EngineFormatError, match=r"missing \['model.norm.weight'\]"):
        load_engine_model(open_engine(engine))


def test_unreadable_weights_file(engine):
    (engine / "rank0.safetensors").write_bytes(b"\xff" * 100)
    rehash(engine, SMALL_CHUNK)
    with pytest.raises(EngineFormatError, match="rank0.safetensors: not a readable safetensors file"):
        load_engine_model(open_engine(engine))


def test_staged_copy_is_exact():
    """The staging path the GPU takes, run on the CPU with a 7-byte buffer: tensors larger than
    the buffer, smaller, empty, 0-dim, and every element size."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        "fp32": torch.randn(11, generator=generator),
        "int64": torch.arange(4, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
        "uint8": torch.arange(20, dtype=torch.uint8),
    }
    out = _stage_to_device(tensors.items(), torch.device("cpu"), staging_bytes=7)
    assert set(out) == set(tensors)
    for name, tensor in tensors.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        assert torch.equal(out[name], tensor), name
        assert out[name].data_ptr() != tensor.data_ptr() or tensor.numel() == 0


def test_timings_describe_without_hashes():
    text = LoadTimings(verify_seconds=0.01, construct_seconds=1.0, weights_seconds=2.0,
                       weight_bytes=16 * 10**9).describe()
    assert "hashes skipped" in text and "16.0 GB of weights in 2.0 s (8.0 GB/s)" in text
