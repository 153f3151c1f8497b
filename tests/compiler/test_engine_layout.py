"""The manifest's "parallel" section: written with one file per rank, checked as untrusted
input, matched against the loading process's ParallelState; and engines written before
rank_files (and before BuildConfig.quant) still open and load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.compiler.loader import load_engine_model
from kiln.compiler.manifest import open_engine
from kiln.errors import EngineFormatError
from kiln.parallel.layout import EngineLayout
from kiln.parallel.state import ParallelState
from tests.compiler.engine_files import manifest_of, rehash, write_manifest
from tests.helpers import build_tiny_engine


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_engine(tmp_path_factory.mktemp("layout"), max_position_embeddings=64)


@pytest.fixture
def engine(built, tmp_path) -> Path:
    return shutil.copytree(built, tmp_path / "engine")


def with_parallel_section(engine_dir: Path, section) -> Path:
    manifest = manifest_of(engine_dir)
    manifest["parallel"] = section
    write_manifest(engine_dir, manifest)
    return engine_dir


def test_build_writes_one_rank_file_per_rank(built):
    assert manifest_of(built)["parallel"] == {"tp": 1, "pp": 1, "rank_files": ["rank0.safetensors"]}
    info = open_engine(built)
    assert info.layout == EngineLayout()
    assert info.rank_file(0) == built / "rank0.safetensors"
    with pytest.raises(EngineFormatError, match=r"no weights for rank 1; the engine has 1 "
                                                r"\(tp 1 × pp 1\)"):
        info.rank_file(1)


def test_engine_from_before_rank_files_opens_and_loads(engine):
    manifest = manifest_of(engine)
    manifest["parallel"] = {"tp": 1, "pp": 1}
    manifest["quant"] = {"scheme": "none"}
    del manifest["build"]["quant"]
    write_manifest(engine, manifest)
    info = open_engine(engine)
    assert info.rank_file(0) == engine / "rank0.safetensors"
    model = load_engine_model(info)
    for name, tensor in load_file(engine / "rank0.safetensors").items():
        assert torch.equal(model.get_parameter(name), tensor), name


@pytest.mark.parametrize("section, needle", [
    (None, r"expected an object with 'tp' and 'pp', got None"),
    ({"tp": "1", "pp": 1}, r"'tp' must be an int >= 1, got '1'"),
    ({"tp": 1, "pp": 0}, r"'pp' must be an int >= 1, got 0"),
    ({"tp": True, "pp": 1}, r"'tp' must be an int >= 1, got True"),
    ({"tp": 2, "pp": 1}, r"'rank_files' is missing; tp 2 × pp 1 needs 2"),
    ({"tp": 2, "pp": 1, "rank_files": ["rank0.safetensors"]},
     r"'rank_files' lists 1 files; tp 2 × pp 1 needs 2"),
    ({"tp": 1, "pp": 1, "rank_files": "rank0.safetensors"}, r"'rank_files' must be a list of file"),
    ({"tp": 1, "pp": 1, "rank_files": ["rank7.safetensors"]},
     r"rank file 'rank7.safetensors' is not among the engine's files"),
    ({"tp": 2, "pp": 1, "rank_files": ["rank0.safetensors", "rank0.safetensors"]},
     r"'rank_files' lists a file twice"),
    ({"tp": 1, "pp": 1, "sharding": "rows"}, r"unknown field 'sharding'; fields: tp, pp, rank_files"),
])
def test_malformed_parallel_section_is_named(engine, section, needle):
    with_parallel_section(engine, section)
    with pytest.raises(EngineFormatError, match=r"manifest 'parallel' section is invalid: " + needle):
        open_engine(engine)


def test_layout_must_match_the_processes(engine):
    # A tp-2 engine (rank 1's file a copy of rank 0's: only the layout is checked here).
    shutil.copy(engine / "rank0.safetensors", engine / "rank1.safetensors")
    manifest = manifest_of(engine)
    manifest["files"]["rank1.safetensors"] = dict(manifest["files"]["rank0.safetensors"])
    write_manifest(engine, manifest)
    rehash(engine, 4096)
    with_parallel_section(engine, {"tp": 2, "pp": 1,
                                   "rank_files": ["rank0.safetensors", "rank1.safetensors"]})
    info = open_engine(engine)
    assert info.rank_file(1) == engine / "rank1.safetensors"
    with pytest.raises(EngineFormatError, match=r"split for tp 2 × pp 1 and must be loaded by "
                                                r"that many processes; this one is rank 0 of "
                                                r"tp 1 × pp 1"):
        load_engine_model(info)


def test_single_rank_engine_refuses_a_sharded_process(built):
    parallel = ParallelState(tp_rank=1, tp_size=2, tp_group=object())
    with pytest.raises(EngineFormatError, match=r"split for tp 1 × pp 1 .* this one is rank 1 "
                                                r"of tp 2 × pp 1"):
        load_engine_model(open_engine(built), parallel=parallel)
