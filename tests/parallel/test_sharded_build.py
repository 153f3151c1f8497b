"""`kiln build --tp N --pp M` (no processes: the build slices with a group-free state): one
file per rank, already sliced; the manifest's parallel section; `kiln inspect` lists the
ranks; random-weight ranks are slices of the tp 1 random engine; bad splits are one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kiln.cli import main as kiln_main
from kiln.compiler.builder import build_engine
from kiln.compiler.manifest import open_engine
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.parallel.state import ParallelState, stage_layer_range
from tests.helpers import save_tiny_hf_model, tiny_llama_config

CONFIG = dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=61)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded-build") / "hf"
    save_tiny_hf_model(tiny_llama_config(**CONFIG), directory)
    return directory


def _rank(engine_dir, rank: int) -> dict[str, torch.Tensor]:
    return load_file(engine_dir / f"rank{rank}.safetensors")


def test_ranks_hold_their_slices_and_stages(checkpoint, tmp_path):
    build_engine(checkpoint, tmp_path / "e", BuildConfig(dtype="float32"), progress=False,
                 tp=2, pp=2)
    engine = open_engine(tmp_path / "e")
    assert engine.manifest["parallel"] == {
        "tp": 2, "pp": 2, "rank_files": [f"rank{r}.safetensors" for r in range(4)]}
    ranks = [_rank(tmp_path / "e", r) for r in range(4)]
    # Stage 0 holds layers 0-1 and the embedding, stage 1 layer 2, the norm and the head.
    assert "model.embed_tokens.weight" in ranks[0] and "lm_head.weight" not in ranks[0]
    assert "lm_head.weight" in ranks[2] and "model.embed_tokens.weight" not in ranks[2]
    assert {n.split(".")[2] for n in ranks[0] if n.startswith("model.layers.")} == {"0", "1"}
    assert {n.split(".")[2] for n in ranks[3] if n.startswith("model.layers.")} == {"2"}
    # Heads split (2 q heads and 1 KV head of 8 dims per rank), vocabulary 61 → 2 × 31.
    assert ranks[1]["model.layers.0.self_attn.qkv_proj.weight"].shape == ((2 + 2 * 1) * 8, 32)
    assert ranks[2]["lm_head.weight"].shape == (31, 32)


def test_random_weight_ranks_are_slices_of_the_single_rank_engine(checkpoint, tmp_path):
    config = BuildConfig(dtype="float32", random_weights=True, seed=4)
    source = checkpoint / "config.json"
    build_engine(source, tmp_path / "one", config, progress=False)
    build_engine(source, tmp_path / "two", config, progress=False, tp=2)
    whole = _rank(tmp_path / "one", 0)
    halves = [_rank(tmp_path / "two", r) for r in range(2)]
    down = "model.layers.1.mlp.down_proj.weight"  # row parallel: columns split
    torch.testing.assert_close(torch.cat([h[down] for h in halves], dim=1), whole[down],
                               rtol=0, atol=0)
    gate_up = "model.layers.0.mlp.gate_up_proj.weight"  # [gate | up] per rank
    gate, up = whole[gate_up].chunk(2)
    torch.testing.assert_close(halves[1][gate_up], torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]),
                               rtol=0, atol=0)


def test_inspect_lists_every_rank(checkpoint, tmp_path, capsys):
    build_engine(checkpoint, tmp_path / "e", BuildConfig(dtype="float32"), progress=False, pp=2)
    assert kiln_main(["inspect", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "tp 1 pp 2" in out
    assert "rank 0      rank0.safetensors: tp rank 0, stage 0 (layers 0-1)" in out
    assert "rank 1      rank1.safetensors: tp rank 0, stage 1 (layers 2-2)" in out


@pytest.mark.parametrize(("tp", "pp", "message"), [
    (3, 1, "cannot split LlamaForCausalLM for tp 3 × pp 1: num_attention_heads 4 is not "
           "divisible by tp 3"),
    (1, 4, "cannot split LlamaForCausalLM for tp 1 × pp 4: 3 layers cannot be split over 4 "
           "pipeline stages"),
    (0, 1, "--tp 0 --pp 1: both must be at least 1"),
])
def test_bad_splits_are_one_line(checkpoint, tmp_path, capsys, tp, pp, message):
    with pytest.raises(KilnError, match=message):
        build_engine(checkpoint, tmp_path / "e", BuildConfig(dtype="float32"), progress=False,
                     tp=tp, pp=pp)
    assert not (tmp_path / "e").exists()
    code = kiln_main(["build", str(checkpoint), "-o", str(tmp_path / "e"), "--tp", str(tp),
                      "--pp", str(pp)])
    assert code == 1 and capsys.readouterr().err.strip() == f"kiln: error: {message}"


def test_stage_layer_ranges_cover_every_layer_once():
    for num_layers in range(1, 9):
        for pp in range(1, num_layers + 1):
            ranges = [stage_layer_range(num_layers, pp, s) for s in range(pp)]
            assert [i for r in ranges for i in r] == list(range(num_layers))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_a_build_time_state_has_no_collectives():
    state = ParallelState.for_slicing(2, 2, 3)
    assert (state.tp_rank, state.pp_rank, state.rank) == (1, 1, 3)
    assert state.is_last_stage and not state.is_driver
    with pytest.raises(RuntimeError, match="build-time"):
        state.all_reduce(torch.zeros(2))
