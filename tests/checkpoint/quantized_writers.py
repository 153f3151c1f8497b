"""Writers of quantised checkpoints for the reader tests, each by its format's published
layout and written independently of kiln's reader: compressed-tensors through the
`compressed-tensors` package itself; AWQ and GPTQ by packing loops over the published bit
positions; references dequantised here, not by kiln."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers import save_tiny_hf_model, tiny_llama_config

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i holds column order[i]


def _pack_words(values: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """(..., n) unsigned values → (..., n·bits/32) int32, value k of each word at bits
    k·bits (optionally taking the values in `order`), by an explicit loop."""
    per_word = 32 // bits
    values = values.to(torch.int64).unflatten(-1, (-1, per_word))
    word = torch.zeros(values.shape[:-1], dtype=torch.int64)
    for k in range(per_word):
        source = order[k] if order is not None else k
        word |= values[..., source] << (bits * k)
    word = torch.where(word >= 2**31, word - 2**32, word)  # two's complement int32
    return word.to(torch.int32)


def _quantize_groups(weight: torch.Tensor, group: int, bits: int, symmetric: bool):
    """Asymmetric/symmetric min-max RTN: (q (out, in) unsigned, scale, zero (out, groups))."""
    levels = 2**bits - 1
    w = weight.unflatten(1, (-1, group))  # (out, groups, G)
    if symmetric:
        scale = w.abs().amax(-1) / (levels // 2)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (high - low) / levels
        zero = (-low / scale).round()
    scale = scale.half().float()
    q = (w / scale[..., None] + zero[..., None]).round().clamp(0, levels)
    return q.flatten(1), scale, zero


def _reference(q, scale, zero, group):
    return ((q.unflatten(1, (-1, group)) - zero[..., None]) * scale[..., None]).flatten(1)


def _tiny_llama_state(directory: Path, seed: int) -> dict[str, torch.Tensor]:
    """A tiny Llama saved as a plain HF checkpoint in `directory`; its tensors, contiguous."""
    model = save_tiny_hf_model(tiny_llama_config(), directory, seed=seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _linear_weight_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The linear layers' weight names (a list: the writers replace entries as they go)."""
    return [name for name in state if any(name.endswith(f"{l}.weight") for l in LINEARS)]


def write_awq(directory: Path, group: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """An AWQ GEMM checkpoint of a tiny Llama; returns the dequantised weights by name."""
    state = _tiny_llama_state(directory, seed)
    expected = {}
    for name in _linear_weight_names(state):
        module = name.removesuffix(".weight")
        q, scale, zero = _quantize_groups(state.pop(name), group, 4, symmetric=False)
        expected[name] = _reference(q, scale, zero, group)
        state[f"{module}.qweight"] = _pack_words(q.T, 4, AWQ_PACK_ORDER)  # (in, out/8)
        state[f"{module}.qzeros"] = _pack_words(zero.T, 4, AWQ_PACK_ORDER)  # (groups, out/8)
        state[f"{module}.scales"] = scale.T.half().contiguous()  # (groups, out)
    _rewrite(directory, state, {"quant_method": "awq", "bits": 4, "group_size": group,
                                "zero_point": True, "version": "gemm"})
    return expected


def write_gptq(directory: Path, group: int = 16, bits: int = 4, version: str = "gptq",
               seed: int = 0, with_g_idx: bool = True) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint (desc_act false); v1 stores zero − 1 (mod 2^bits)."""
    state = _tiny_llama_state(directory, seed)
    expected = {}
    symmetric = bits == 8
    for name in _linear_weight_names(state):
        module = name.removesuffix(".weight")
        weight = state.pop(name)
        q, scale, zero = _quantize_groups(weight, group, bits, symmetric=symmetric)
        expected[name] = _reference(q, scale, zero, group)
        stored_zero = (zero - 1) % 2**bits if version == "gptq" else zero
        state[f"{module}.qweight"] = _pack_words(q, bits).T.contiguous()  # (in·b/32, out)
        state[f"{module}.qzeros"] = _pack_words(stored_zero.T, bits)  # (groups, out·b/32)
        state[f"{module}.scales"] = scale.T.half().contiguous()
        if with_g_idx:
            state[f"{module}.g_idx"] = (torch.arange(weight.shape[1]) // group).to(torch.int32)
    _rewrite(directory, state, {"quant_method": "gptq", "bits": bits, "group_size": group,
                                "desc_act": False, "sym": symmetric, "checkpoint_format": version})
    return expected


def _rewrite(directory: Path, state: dict, quantization_config: dict) -> None:
    for old in directory.glob("*.safetensors"):
        old.unlink()
    save_file(state, str(directory / "model.safetensors"))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config
    config_path.write_text(json.dumps(config))


def set_quantization_config(directory: Path, **changes) -> None:
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"].update(changes)
    config_path.write_text(json.dumps(config))


def write_compressed_tensors(directory: Path, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Llama compressed by the compressed-tensors package: kind "int4" (group 16,
    asymmetric, pack-quantized), "int4-sym-channel", "int8" (channel, symmetric,
    pack-quantized), "fp8" (channel weights, static tensor input scales) or "fp8-tensor"
    (per-tensor weight scales, dynamic inputs). Returns the package's own dequantised
    weights (its decompressor), by name."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = save_tiny_hf_model(tiny_llama_config(), directory, seed=seed)
    activations = None
    if kind == "int4":
        weights, fmt = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=16,
                                        symmetric=False), "pack-quantized"
    elif kind == "int4-sym-channel":
        weights, fmt = QuantizationArgs(num_bits=4, type="int", strategy="channel"), "pack-quantized"
    elif kind == "int8":
        weights, fmt = QuantizationArgs(num_bits=8, type="int", strategy="channel"), "pack-quantized"
    elif kind == "fp8":
        weights, fmt = QuantizationArgs(num_bits=8, type="float", strategy="channel"), "float-quantized"
        activations = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False)
    else:
        weights, fmt = QuantizationArgs(num_bits=8, type="float", strategy="tensor"), "float-quantized"
        activations = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head"]))
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        w = module.weight.data
        if weights.strategy == "group":
            low, high = (w.unflatten(1, (-1, 16)).amin(-1), w.unflatten(1, (-1, 16)).amax(-1))
        elif weights.strategy == "channel":
            low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            low, high = w.amin().reshape(1), w.amax().reshape(1)
        scale, zero = calculate_qparams(low, high, weights)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape)
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(0.02)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    for old in directory.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    compressor.decompress_model(model)
    return {f"{name}.weight": module.weight.detach().float().clone()
            for name, module in model.named_modules()
            if any(name.endswith(l) for l in LINEARS)}


def write_modelopt_fp8(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ModelOpt FP8 export: E4M3 weights with one float32 scale per tensor, static input
    scales, KV-cache scales, and hf_quant_config.json naming the algorithm."""
    state = _tiny_llama_state(directory, seed)
    expected = {}
    for name in _linear_weight_names(state):
        module = name.removesuffix(".weight")
        weight = state[name]
        scale = weight.abs().max() / 448.0
        q = (weight / scale).to(torch.float8_e4m3fn)
        expected[name] = q.float() * scale
        state[name] = q
        state[f"{module}.weight_scale"] = scale.reshape(())
        state[f"{module}.input_scale"] = torch.tensor(0.03)
        if module.endswith(("k_proj", "v_proj")):
            state[f"{module}.{module[-6]}_scale"] = torch.tensor(0.01)  # k_scale / v_scale
    _rewrite(directory, state, {"quant_method": "modelopt", "quant_algo": "FP8"})
    (directory / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.29.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
                         "exclude_modules": ["lm_head"]}}))
    return expected
