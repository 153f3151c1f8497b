"""The vocabulary-parallel embedding and LM head at tp 1 are the plain lookup and matmul
(exactly: the same ops), shard and pad the vocabulary at tp > 1, and the attention layer
carries KV scales that survive construction on the meta device. The 2-rank numerics are in
tests/parallel/."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import CheckpointError
from kiln.layers.attention import Attention
from kiln.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kiln.parallel.state import SINGLE_PROCESS, ParallelState

VOCAB, HIDDEN = 7, 4


def loaded_embedding(parallel: ParallelState = SINGLE_PROCESS):
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
    embedding = VocabParallelEmbedding(VOCAB, HIDDEN, parallel=parallel, prefix="embed_tokens")
    embedding.load_checkpoint_tensor("weight", weight, source_name="embed_tokens.weight")
    return embedding, weight


def test_single_rank_embedding_and_head_are_the_plain_ops():
    embedding, weight = loaded_embedding()
    ids = torch.tensor([0, 6, 3, 3])
    assert torch.equal(embedding(ids), torch.nn.functional.embedding(ids, weight))

    hidden = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.linear(hidden, weight)  # (3, V)
    for head in (ParallelLMHead(VOCAB, HIDDEN, tied_to=embedding, parallel=SINGLE_PROCESS,
                                prefix="lm_head"),
                 ParallelLMHead(VOCAB, HIDDEN, tied_to=None, parallel=SINGLE_PROCESS,
                                prefix="lm_head")):
        if head.tied_to is None:
            head.load_checkpoint_tensor("weight", weight, source_name="lm_head.weight")
        assert head.vocab_size == VOCAB
        logits = head(hidden)
        assert logits.dtype == torch.float32 and torch.equal(logits, expected)
        out = torch.empty(3, VOCAB)
        assert head.logits_into(hidden, out) is out and torch.equal(out, expected)
        row = hidden[1:2]  # the one-row (GEMV) path; one row rounds differently from three
        assert torch.equal(head.logits_into(row, out[:1]), torch.nn.functional.linear(row, weight))


def test_tied_head_owns_no_weight():
    embedding, _ = loaded_embedding()
    head = ParallelLMHead(VOCAB, HIDDEN, tied_to=embedding, parallel=SINGLE_PROCESS, prefix="lm_head")
    assert head.checkpoint_tensor_names() == () and list(head.parameters(recurse=False)) == []


def test_shards_are_padded_to_a_multiple_of_tp():
    # Vocabulary 7 over 2 ranks: shards of 4; rank 1 holds ids 4, 5, 6 and one zero row.
    embedding, weight = loaded_embedding(ParallelState(tp_rank=1, tp_size=2, tp_group=object()))
    assert embedding.shard.padded_vocab_size == 8 and embedding.shard.start == 4
    assert torch.equal(embedding.weight[:3], weight[4:]) and not embedding.weight[3].any()


def test_wrong_vocabulary_size_is_named():
    embedding = VocabParallelEmbedding(VOCAB, HIDDEN, parallel=SINGLE_PROCESS, prefix="wte")
    with pytest.raises(CheckpointError, match=r"tensor 'wte.weight' has shape \(8, 4\), "
                                              r"expected \(7, 4\)"):
        embedding.load_checkpoint_tensor("weight", torch.zeros(8, 4), source_name="wte.weight")


def test_kv_scales_are_float32_ones_outside_the_state_dict():
    with torch.device("meta"):  # as load_engine_model builds the model
        attention = Attention(num_heads=4, head_dim=8, num_kv_heads=2, scale=0.125)
    for name in ("k_scale", "v_scale"):
        scale = getattr(attention, name)
        assert scale.device.type == "cpu" and scale.dtype == torch.float32 and scale.item() == 1.0
    assert attention.state_dict() == {}
