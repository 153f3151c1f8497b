"""Two CPU processes joined by gloo run a tiny Llama at tp 2 and match the same checkpoint at
tp 1: the vocabulary-parallel embedding (odd vocabulary, padded) and its all-reduce, q|k|v
split by heads (KV heads replicated when there are fewer than ranks), gate|up split by rows,
row-parallel o/down projections with their all-reduce and bias, and the LM head's all-gather
in both its float32 and its write-into-a-buffer forms, over a prefill and a decode step.

Tolerance: float32 on both sides; a row-parallel matmul sums its halves in another order, so
results differ by a few float32 ulps (~1e-6 relative), far below any slicing mistake.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.compiler.builder import model_config_from_hf
from kiln.models.registry import get_model_class
from kiln.parallel.state import SINGLE_PROCESS, ParallelState
from tests.models.model_inputs import prefill_then_decode

TP = 2


def _run_both(rank: int, rendezvous: str, checkpoint_dirs: list[str]) -> None:
    parallel = ParallelState.initialize(TP, 1, rank, backend="gloo", init_method=f"file://{rendezvous}")
    try:
        for directory in map(Path, checkpoint_dirs):
            config = model_config_from_hf(json.loads((directory / "config.json").read_text()))
            tensors = load_file(directory / "model.safetensors")
            models = []
            for state in (SINGLE_PROCESS, parallel):
                model = get_model_class(config.architecture)(config, parallel=state).eval()
                model.load_checkpoint_weights(tensors.items())
                models.append(model)
            single, sharded = models
            prompt = torch.randint(0, config.vocab_size, (7,),
                                   generator=torch.Generator().manual_seed(3)).tolist()
            for expected, actual in zip(prefill_then_decode(single, prompt, config.vocab_size - 1),
                                        prefill_then_decode(sharded, prompt, config.vocab_size - 1)):
                assert actual.shape == expected.shape == (actual.shape[0], config.vocab_size)
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
            hidden = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(4))
            out = torch.empty(3, config.vocab_size)
            with torch.no_grad():
                sharded.compute_logits_into(hidden, out)
                torch.testing.assert_close(out, single.compute_logits(hidden), rtol=1e-5, atol=1e-5)
    finally:
        parallel.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    import transformers

    from tests.helpers import save_tiny_hf_model

    configs = [
        # Untied head, GQA (one KV head per rank), biases on q|k|v and o, vocabulary 11.
        transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=11, max_position_embeddings=64, attention_bias=True,
        ),
        # Tied head, one KV head shared by both ranks, MLP biases, vocabulary 13.
        transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, vocab_size=13, max_position_embeddings=64, mlp_bias=True,
            tie_word_embeddings=True,
        ),
    ]
    directories = []
    for index, config in enumerate(configs):
        directory = tmp_path_factory.mktemp(f"tp-checkpoint-{index}")
        save_tiny_hf_model(config, directory)
        directories.append(str(directory))
    return directories


def test_two_ranks_match_one(checkpoints, tmp_path):
    torch.multiprocessing.spawn(
        _run_both, args=(str(tmp_path / "rendezvous"), checkpoints), nprocs=TP, join=True
    )
