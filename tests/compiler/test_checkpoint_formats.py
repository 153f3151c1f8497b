"""Checkpoint layouts other than one model.safetensors: sharded safetensors with an index,
and legacy pytorch_model.bin (loaded with weights_only=True, so a pickle that runs code is
refused). Plus RELIABILITY.md's grep: no unsafe deserialisation anywhere in the package."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
import transformers

from kiln.compiler.builder import build_engine
from kiln.config import BuildConfig
from kiln.errors import CheckpointError
from tests.helpers import SequenceRunner, save_tiny_hf_model, tiny_llama_config

CONFIG = tiny_llama_config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def logits_error(hf_model, engine_dir: Path) -> float:
    prompt = [5, 9, 2, 77, 31]
    logits = SequenceRunner(engine_dir).step(prompt)
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0]
    return ((logits - expected).norm() / expected.norm()).item()


def test_sharded_safetensors_with_index(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    build_engine(tmp_path / "hf", tmp_path / "engine", BuildConfig(dtype="float32"), progress=False)
    assert logits_error(model, tmp_path / "engine") < 1e-5


def test_pytorch_bin_weights(tmp_path):
    model = save_tiny_hf_model(CONFIG, tmp_path / "hf")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    build_engine(tmp_path / "hf", tmp_path / "engine", BuildConfig(dtype="float32"), progress=False)
    assert logits_error(model, tmp_path / "engine") < 1e-5


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    save_tiny_hf_model(CONFIG, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with open(tmp_path / "hf" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load .bin weights safely"):
        build_engine(tmp_path / "hf", tmp_path / "engine", BuildConfig(dtype="float32"), progress=False)
    assert not (tmp_path / "engine").exists()


def test_no_unsafe_deserialisation_in_the_package():
    package = Path(__file__).resolve().parents[2] / "kiln"
    offenders = []
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"pickle\.loads?\(", r"recv_pyobj", r"torch\.load\((?![^)]*weights_only=True)"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(package)}: {pattern}")
    assert offenders == []
