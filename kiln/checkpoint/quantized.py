"""Quantised Hugging Face checkpoints, kept quantised: each format's tensors converted to the
layout of kiln's schemes (see kiln/checkpoint/packing.py and the quantisation contract) and
handed out under HF names, so the build loads them with prequantized=True and never
re-quantises.

    format (config)                               scheme    tensors handed out per linear
    compressed-tensors float-quantized, FP8       fp8       weight (fp8), weight_scale (out,)
                                                            float32, input_scale (1,) if static
    compressed-tensors pack-quantized, 4-bit      int4-wo   qweight, weight_scale, weight_zero
    compressed-tensors pack/int-quantized, 8-bit  int8-wo   weight (int8), weight_scale
    AWQ (quant_method awq, GEMM)                  int4-wo   qweight, weight_scale, weight_zero
    GPTQ (quant_method gptq, desc_act false)      int4-wo / int8-wo (symmetric 8-bit)
    ModelOpt FP8 (hf_quant_config.json)           fp8       weight, weight_scale, input_scale

Anything else in the config (other bit widths, activation order, an unknown method or
strategy, transforms, sparsity) is refused with one line naming the field; a linear that lacks
one of its tensors, or has one of the wrong dtype or shape, is refused naming the tensor, and
so is a scale that is not finite (scales are small: every one is checked; weights are not).

An FP8 KV cache the config declares (compressed-tensors kv_cache_scheme, ModelOpt
kv_cache_quant_algo) comes with a k_scale and a v_scale per decoder layer: they are read into
CheckpointQuantization.kv_scales for the build's manifest (kiln/compiler/builder.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kiln.checkpoint.base import TensorSource
from kiln.checkpoint.packing import (
    awq_unpack,
    pack_int4_rows,
    unpack_int32_bytes,
    unpack_int32_nibbles,
)
from kiln.errors import CheckpointError

# Module names (HF) of the linears a decoder has; lm_head is handled as an ignored layer.
_LINEAR = re.compile(r"(.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))\.")
# KV-cache scales: compressed-tensors keeps them on the attention module
# (layers.N.self_attn.k_scale; llm-compressor before that: k_proj.output_scale), ModelOpt on
# the projection (layers.N.self_attn.k_proj.k_scale).
_KV_SCALE = re.compile(r".*\.layers\.(\d+)\.self_attn\."
                       r"(?:(?:[kv]_proj\.)?([kv])_scale|([kv])_proj\.output_scale)$")
# HF projections kiln fuses into one layer, which must be all quantised or none (GGUF too).
FUSED_PROJECTIONS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a quantised checkpoint is, as the manifest's "quant" section will say it."""

    scheme: str  # "fp8" | "int8-wo" | "int4-wo"
    params: dict  # the scheme's parameters (group_size, zero_point, activation_scales)
    source_format: str  # "compressed-tensors" | "awq" | "gptq" | "modelopt" | "gguf"
    # kiln layer prefixes (fused names) the checkpoint keeps in full precision.
    unquantized_layers: tuple[str, ...] = ()
    # "fp8" when the config declares an FP8 KV cache with stored scales (compressed-tensors
    # kv_cache_scheme, ModelOpt kv_cache_quant_algo); then kv_scales holds each decoder
    # layer's (k_scale, v_scale) as read from the tensors (empty before they are read).
    kv_cache: str | None = None
    kv_scales: tuple[tuple[float, float], ...] = ()

    def quant_section(self) -> dict:
        section = {"scheme": self.scheme, **self.params, "prequantized": True,
                   "source_format": self.source_format}
        if self.unquantized_layers:
            section["unquantized_layers"] = list(self.unquantized_layers)
        return section

    def describe(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.params.items())
        return f"{self.source_format} {self.scheme}" + (f" ({extra})" if extra else "")


def _refuse(where: str, key: str, value, why: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return CheckpointError(f"{where}: {key} = {shown}: {why}")


_FLOAT_SCALES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checked(name: str, tensor: torch.Tensor, *, dtypes: tuple[torch.dtype, ...] = (),
             shape: tuple[int | str, ...] | None = None, why: str = "",
             finite: bool = False) -> torch.Tensor:
    """The checkpoint's tensor `name`, after checking what unpacking it relies on: a dtype in
    `dtypes`; `shape` (an int: that size; a str: any size >= 1, named in the message, `why`
    appended to it); every value finite (for scales only, which are small: weights are
    never scanned)."""
    if dtypes and tensor.dtype not in dtypes:
        names = [_dtype_name(d) for d in dtypes]
        expected = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise CheckpointError(f"tensor {name} is {_dtype_name(tensor.dtype)}, expected {expected}")
    if shape is not None and (tensor.dim() != len(shape) or any(
            size != want if isinstance(want, int) else size < 1
            for size, want in zip(tensor.shape, shape))):
        shown = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
        raise CheckpointError(
            f"tensor {name} has shape {tuple(tensor.shape)}, expected {shown}{why}")
    if finite:
        bad = ~torch.isfinite(tensor)
        count = int(bad.sum())
        if count:
            first = torch.nonzero(bad)[0].tolist()
            at = f" at {first}" if first else ""
            raise CheckpointError(
                f"tensor {name} has {count} non-finite value{'s' if count > 1 else ''} "
                f"(first: {float(tensor[tuple(first)])}{at}); the checkpoint is corrupt")
    return tensor


def _float16_scales(name: str, scale: torch.Tensor) -> torch.Tensor:
    """`scale` as the float16 kiln's int schemes store, or CheckpointError where a finite
    value lies beyond float16's range (it would become inf, and the layer's outputs NaN)."""
    converted = scale.to(torch.float16)
    over = torch.isinf(converted) & torch.isfinite(scale)
    if bool(over.any()):
        first = torch.nonzero(over)[0].tolist()
        raise CheckpointError(
            f"tensor {name} holds {float(scale[tuple(first)])} at {first}, beyond float16's "
            "range (±65504) in which kiln stores int scales; the checkpoint's weights are "
            "not what an int4 / int8 checkpoint of a real model holds")
    return converted


def _words(get, name: str, shape: tuple[str, str]) -> torch.Tensor:
    """AWQ's / GPTQ's packed qweight or qzeros: 2-D int32 words."""
    return _checked(name, get(name), dtypes=(torch.int32,), shape=shape)


def _group_scales(get, module: str, in_features: int, out_features: int,
                  group_size: int) -> torch.Tensor:  # (out, groups)
    """AWQ's / GPTQ's scales (in / group_size, out), checked against the config's group size
    (-1: one group)."""
    if group_size != -1 and in_features % group_size:
        raise CheckpointError(f"quantization_config.group_size {group_size} does not divide "
                              f"{module}'s {in_features} input features")
    groups = 1 if group_size == -1 else in_features // group_size
    name = f"{module}.scales"
    return _checked(name, get(name), dtypes=_FLOAT_SCALES, finite=True,
                    shape=(groups, out_features), why=f" (quantization_config.group_size "
                    f"{group_size} over {in_features} input features)").T


# ─── one converter per format: module name → its contract tensors ──────────────────────


@dataclass
class _Converter:
    """Per quantised linear module: the source tensors it needs, and the contract tensors
    (name → function of the source tensors) it hands out."""

    marker: str  # the source tensor whose presence makes a module quantised
    needs: tuple[str, ...]  # every source tensor suffix the module must have
    outputs: dict[str, Callable[[Callable[[str], torch.Tensor], str], torch.Tensor]]
    # Source suffixes dropped silently (g_idx, weight_shape, KV-cache scales …).
    dropped: tuple[str, ...] = ()
    where: str = "config.json"
    # Every tensor name of the checkpoint (filled in by QuantizedTensors), for the
    # converters that look at an optional tensor (GPTQ's g_idx).
    available: set[str] = field(default_factory=set)


def _fp8_converter(
    where: str, static_input: bool, scale_name: str = "weight_scale"
) -> _Converter:
    def weight(get, module):
        name = f"{module}.weight"
        return _checked(name, get(name), dtypes=(torch.float8_e4m3fn,))

    def weight_scale(get, module):
        name = f"{module}.{scale_name}"
        scale = _checked(name, get(name), dtypes=_FLOAT_SCALES, finite=True).float()
        rows = get(f"{module}.weight").shape[0]
        if scale.numel() == 1:  # per tensor: the contract keeps one per output channel
            return scale.reshape(()).expand(rows).clone()
        if scale.numel() != rows:
            raise CheckpointError(
                f"tensor {module}.{scale_name} has shape {tuple(scale.shape)}: expected one "
                f"scale per tensor or per output channel ({rows})"
            )
        return scale.reshape(rows)

    def input_scale(get, module):
        name = f"{module}.input_scale"
        scale = _checked(name, get(name), dtypes=_FLOAT_SCALES, finite=True)
        if scale.numel() != 1:
            raise CheckpointError(f"tensor {name} has shape {tuple(scale.shape)}, expected one "
                                  "value (a static per-tensor input scale)")
        if float(scale) <= 0:
            raise CheckpointError(f"tensor {name} = {float(scale)}: expected a positive scale "
                                  "(activations are divided by it)")
        return scale.float().reshape(1)

    outputs = {"weight": weight, "weight_scale": weight_scale}
    needs = ("weight", scale_name)
    if static_input:
        outputs["input_scale"] = input_scale
        needs += ("input_scale",)
    # A linear is quantised when it has a weight scale (an excluded lm_head has none).
    return _Converter(scale_name, needs, outputs, where=where)


def _int4_outputs(unpack: Callable) -> dict:
    """unpack(get, module) → (q (out, in) 0..15, scale (out, groups), zero (out, groups))."""
    return {
        "qweight": lambda get, module: pack_int4_rows(unpack(get, module)[0]),
        "weight_scale": lambda get, module: _float16_scales(f"{module}'s scales",
                                                            unpack(get, module)[1]),
        "weight_zero": lambda get, module: unpack(get, module)[2].to(torch.float16),
    }


def _ct_unsupported(config: dict, group: dict, weights: dict, where: str, key: str) -> None:
    """Refuse the compressed-tensors fields that change what the stored tensors mean, which
    kiln would otherwise ignore."""
    if config.get("transform_config"):
        raise _refuse(where, "quantization_config.transform_config", config["transform_config"],
                      "transforms (rotations of the weights) are not supported")
    sparsity = config.get("sparsity_config")
    # "dense" is the package's identity format: the weights are stored as they are.
    if sparsity and not (isinstance(sparsity, dict) and sparsity.get("format") == "dense"):
        raise _refuse(where, "quantization_config.sparsity_config", sparsity,
                      "sparse compression formats are not supported")
    # "weight" (alias "static") only changes the order GPTQ visited the columns in: the
    # stored format is the same (the package's ActivationOrdering); "group" needs a g_idx.
    actorder = weights.get("actorder")
    if actorder not in (None, False) and str(actorder).lower() not in ("weight", "static"):
        raise _refuse(where, f"{key}.weights.actorder", actorder,
                      "activation-ordered groups are not supported; expected null or weight")
    if group.get("output_activations") is not None:
        raise _refuse(where, f"{key}.output_activations", group["output_activations"],
                      "quantised output activations are not supported")


def _ct_packed(get, module: str, bits: int) -> tuple[torch.Tensor, int, int]:
    """compressed-tensors' weight_packed (out, ⌈in·bits/32⌉) int32, checked against the
    (out, in) its weight_shape says: (weight_packed, out, in)."""
    name = f"{module}.weight_shape"
    sizes = _checked(name, get(name), dtypes=(torch.int32, torch.int64), shape=(2,)).tolist()
    if min(sizes) < 1:
        raise CheckpointError(f"tensor {name} = {sizes}: expected two positive sizes (out, in)")
    out, columns = sizes
    packed_name = f"{module}.weight_packed"
    packed = _checked(packed_name, get(packed_name), dtypes=(torch.int32,),
                      shape=(out, -(-columns * bits // 32)), why=f" for weight_shape {sizes}")
    return packed, out, columns


def _compressed_tensors(
    config: dict, where: str
) -> tuple[CheckpointQuantization, _Converter]:
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _refuse(where, "quantization_config.config_groups",
                      None if not isinstance(groups, dict) else sorted(groups),
                      "exactly one quantisation group (one scheme for every linear) is supported")
    (group_name, group), = groups.items()
    key = f"quantization_config.config_groups.{group_name}"
    if not isinstance(group, dict):
        raise _refuse(where, key, group, "expected an object")
    weights, activations = group.get("weights"), group.get("input_activations")
    if not isinstance(weights, dict):
        raise _refuse(where, f"{key}.weights", weights, "expected an object")
    if activations is not None and not isinstance(activations, dict):
        raise _refuse(where, f"{key}.input_activations", activations, "expected an object")
    _ct_unsupported(config, group, weights, where, key)
    kv_cache = _ct_kv_cache(config.get("kv_cache_scheme"), where)
    fmt = group.get("format") or config.get("format")
    bits, kind = weights.get("num_bits"), weights.get("type")
    strategy, symmetric = weights.get("strategy"), weights.get("symmetric", True)
    if kind == "float":
        if fmt != "float-quantized" or bits != 8:
            raise _refuse(where, f"{key}.weights.num_bits", bits, "only 8-bit float "
                          "(FP8 E4M3) float-quantized weights are supported")
        if strategy not in ("tensor", "channel"):
            raise _refuse(where, f"{key}.weights.strategy", strategy,
                          "FP8 weights need a per-tensor or per-channel scale")
        static = False
        if activations is not None:
            if activations.get("type") != "float" or activations.get("num_bits") != 8:
                raise _refuse(where, f"{key}.input_activations.type", activations.get("type"),
                              "only FP8 input activations are supported")
            static = not activations.get("dynamic", False)
            if static and activations.get("strategy") != "tensor":
                raise _refuse(where, f"{key}.input_activations.strategy",
                              activations.get("strategy"),
                              "static input scales must be per tensor")
        params = {"activation_scales": "static" if static else "dynamic"}
        return (CheckpointQuantization("fp8", params, "compressed-tensors", kv_cache=kv_cache),
                _fp8_converter(where, static))
    if kind != "int":
        raise _refuse(where, f"{key}.weights.type", kind, "expected int or float")
    if activations is not None:
        raise _refuse(where, f"{key}.input_activations", "set", "integer schemes are weight-only "
                      "here (W4A16/W8A16): activations must not be quantised")
    if bits not in (4, 8):
        raise _refuse(where, f"{key}.weights.num_bits", bits, "only 4-bit (int4-wo) and 8-bit "
                      "(int8-wo) integer weights are supported")
    if strategy not in ("group", "channel"):
        raise _refuse(where, f"{key}.weights.strategy", strategy, "expected group or channel")
    group_size = -1
    if strategy == "group":
        group_size = weights.get("group_size")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise _refuse(where, f"{key}.weights.group_size", group_size,
                          "strategy group needs a positive integer group size")
    if bits == 8 and not symmetric:
        raise _refuse(where, f"{key}.weights.symmetric", symmetric,
                      "int8-wo is symmetric; asymmetric 8-bit weights are not supported")
    if fmt not in ("pack-quantized", "int-quantized", "naive-quantized"):
        raise _refuse(where, "quantization_config.format", fmt,
                      "integer weights must be pack-quantized, int-quantized or naive-quantized")
    if bits == 4 and fmt != "pack-quantized":
        raise _refuse(where, "quantization_config.format", fmt,
                      "4-bit weights must be pack-quantized")

    def weight_scale(get, module):  # (out, groups)
        name = f"{module}.weight_scale"
        return _checked(name, get(name), dtypes=_FLOAT_SCALES, finite=True)

    if bits == 8:
        def weight(get, module):
            if fmt == "pack-quantized":
                packed, _, columns = _ct_packed(get, module, bits)
                return (unpack_int32_bytes(packed)[:, :columns] - 128).to(torch.int8)
            # Any other dtype would wrap on conversion (300 → 44): refuse it.
            name = f"{module}.weight"
            return _checked(name, get(name), dtypes=(torch.int8,))

        marker = "weight_packed" if fmt == "pack-quantized" else "weight"
        needs = (marker, "weight_scale") + (("weight_shape",) if fmt == "pack-quantized" else ())
        outputs = {"weight": weight, "weight_scale":
                   lambda get, module: _float16_scales(f"{module}.weight_scale",
                                                       weight_scale(get, module))}
        quant = CheckpointQuantization("int8-wo", {"group_size": group_size}, "compressed-tensors",
                                       kv_cache=kv_cache)
        return quant, _Converter(marker, needs, outputs, dropped=("weight_shape",), where=where)

    def unpack(get, module):
        packed, out, columns = _ct_packed(get, module, bits)
        q = unpack_int32_nibbles(packed, dim=-1)[:, :columns]  # stored q + 8
        scale = weight_scale(get, module)  # (out, groups)
        if symmetric:
            zero = torch.full(scale.shape, 8.0)
        else:  # zp + 8
            zero = unpack_int32_nibbles(get(f"{module}.weight_zero_point"), dim=0)[:out]
        return q, scale, zero

    needs = ("weight_packed", "weight_scale", "weight_shape")
    needs += () if symmetric else ("weight_zero_point",)
    quant = CheckpointQuantization(
        "int4-wo", {"group_size": group_size, "zero_point": not symmetric}, "compressed-tensors",
        kv_cache=kv_cache)
    return quant, _Converter("weight_packed", needs, _int4_outputs(unpack),
                             dropped=("weight_shape",), where=where)


def _awq(config: dict, where: str) -> tuple[CheckpointQuantization, _Converter]:
    bits = config.get("bits", config.get("w_bit"))
    group_size = config.get("group_size", config.get("q_group_size"))
    version = str(config.get("version", "gemm")).lower()
    if bits != 4:
        raise _refuse(where, "quantization_config.bits", bits, "AWQ checkpoints must be 4-bit")
    if version != "gemm":
        raise _refuse(where, "quantization_config.version", version,
                      "only the AWQ GEMM layout is supported (not gemv/marlin/exllama)")
    if not config.get("zero_point", True):
        raise _refuse(where, "quantization_config.zero_point", False,
                      "AWQ without zero points is not supported")
    if not isinstance(group_size, int) or group_size <= 0:
        raise _refuse(where, "quantization_config.group_size", group_size,
                      "expected a positive group size")

    def unpack(get, module):
        qweight = _words(get, f"{module}.qweight", ("in", "out/8"))
        q = awq_unpack(qweight).T  # (in, out) → (out, in)
        zero = awq_unpack(_words(get, f"{module}.qzeros", ("groups", "out/8"))).T  # (out, groups)
        scale = _group_scales(get, module, q.shape[1], q.shape[0], group_size)  # (out, groups)
        return q, scale, zero

    quant = CheckpointQuantization("int4-wo", {"group_size": group_size, "zero_point": True}, "awq")
    return quant, _Converter("qweight", ("qweight", "qzeros", "scales"), _int4_outputs(unpack),
                             where=where)


def _gptq(config: dict, where: str) -> tuple[CheckpointQuantization, _Converter]:
    bits, group_size = config.get("bits"), config.get("group_size", -1)
    if bits not in (4, 8):
        raise _refuse(where, "quantization_config.bits", bits,
                      "only 4-bit and 8-bit GPTQ are supported")
    if config.get("desc_act", False):
        raise _refuse(where, "quantization_config.desc_act", True, "activation-order GPTQ is not "
                      "supported; re-export with desc_act false")
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise _refuse(where, "quantization_config.checkpoint_format", checkpoint_format,
                      "expected gptq or gptq_v2")
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise _refuse(where, "quantization_config.group_size", group_size,
                      "expected a positive group size or -1")
    # v1 stores z − 1 modulo 2^bits (AutoGPTQ's historical off-by-one); v2 stores z.
    zero_offset = 1 if checkpoint_format == "gptq" else 0
    mask = (1 << bits) - 1

    def unpack_values(packed: torch.Tensor, dim: int) -> torch.Tensor:
        if bits == 4:
            return unpack_int32_nibbles(packed, dim)
        if dim == 0:  # 4 bytes per word down the rows
            return unpack_int32_bytes(packed.T).T
        return unpack_int32_bytes(packed)

    def trivial_g_idx(get, module, columns: int, group: int):
        name = f"{module}.g_idx"
        if name in converter.available:
            g_idx = _checked(name, get(name), shape=(columns,),
                             why=" (one group index per input column)").long()
            if not torch.equal(g_idx, torch.arange(columns) // group):
                raise CheckpointError(f"tensor {name} is not in order (activation-order "
                                      "GPTQ is not supported; re-export with desc_act false)")

    def qweight(get, module):  # (in·bits/32, out)
        return _words(get, f"{module}.qweight", (f"in·{bits}/32", "out"))

    def unpack(get, module):
        q = unpack_values(qweight(get, module), dim=0).T  # (in, out) → (out, in)
        qzeros = _words(get, f"{module}.qzeros", ("groups", f"out·{bits}/32"))
        zero = ((unpack_values(qzeros, dim=-1) + zero_offset) & mask).T
        out, columns = q.shape
        scale = _group_scales(get, module, columns, out, group_size)  # (out, groups)
        trivial_g_idx(get, module, columns, columns // scale.shape[1])
        return q, scale, zero[:out]

    needs = ("qweight", "qzeros", "scales")
    if bits == 4:
        quant = CheckpointQuantization("int4-wo", {"group_size": group_size,
                                                   "zero_point": not config.get("sym", True)},
                                       "gptq")
        converter = _Converter("qweight", needs, _int4_outputs(unpack), dropped=("g_idx",),
                               where=where)
    else:
        def weight(get, module):
            q, _, zero = unpack(get, module)
            if not bool((zero == 128).all()):
                raise CheckpointError(f"tensor {module}.qzeros: 8-bit GPTQ must be symmetric "
                                      "(zero point 128) for int8-wo")
            return (q - 128).to(torch.int8)

        def weight_scale(get, module):
            packed = qweight(get, module)  # (in·8/32, out)
            scale = _group_scales(get, module, packed.shape[0] * 4, packed.shape[1], group_size)
            return _float16_scales(f"{module}.scales", scale)

        quant = CheckpointQuantization("int8-wo", {"group_size": group_size}, "gptq")
        converter = _Converter("qweight", needs, {"weight": weight, "weight_scale": weight_scale},
                               dropped=("g_idx",), where=where)
    return quant, converter


def _modelopt(directory: Path) -> tuple[CheckpointQuantization, _Converter]:
    path = directory / "hf_quant_config.json"
    where = str(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not readable JSON: {error}") from None
    quantization = config.get("quantization") if isinstance(config, dict) else None
    if not isinstance(quantization, dict):
        raise _refuse(where, "quantization", quantization, "expected an object")
    algo = quantization.get("quant_algo")
    if algo != "FP8":
        raise _refuse(where, "quantization.quant_algo", algo, "only ModelOpt FP8 is supported")
    kv_algo = quantization.get("kv_cache_quant_algo")
    if kv_algo not in (None, "FP8"):
        raise _refuse(where, "quantization.kv_cache_quant_algo", kv_algo,
                      "only an FP8 KV cache (or none) is supported")
    quant = CheckpointQuantization("fp8", {"activation_scales": "static"}, "modelopt",
                                   kv_cache="fp8" if kv_algo == "FP8" else None)
    return quant, _fp8_converter(where, static_input=True)


def detect(directory: Path, config: dict) -> tuple[CheckpointQuantization, _Converter] | None:
    """The checkpoint's quantisation, or None for a full-precision checkpoint."""
    where = str(directory / "config.json")
    if (directory / "hf_quant_config.json").is_file():
        return _modelopt(directory)
    quant_config = config.get("quantization_config")
    if quant_config is None:
        return None
    if not isinstance(quant_config, dict):
        raise _refuse(where, "quantization_config", type(quant_config).__name__,
                      "expected an object")
    method = quant_config.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(quant_config, where)
    if method == "awq":
        return _awq(quant_config, where)
    if method == "gptq":
        return _gptq(quant_config, where)
    if method == "modelopt":
        raise CheckpointError(
            f"{where}: quant_method modelopt needs hf_quant_config.json beside it")
    raise _refuse(where, "quantization_config.quant_method", method,
                  "supported: compressed-tensors, awq, gptq, modelopt (fp8)")


# ─── KV-cache scales ───────────────────────────────────────────────────────────────────


def _ct_kv_cache(scheme, where: str) -> str | None:
    """compressed-tensors' kv_cache_scheme → "fp8" (static E4M3, one scale per layer for k and
    for v: what kiln's FP8 cache takes), None when absent; anything else is refused."""
    if scheme is None:
        return None
    key = "quantization_config.kv_cache_scheme"
    if not isinstance(scheme, dict):
        raise _refuse(where, key, scheme, "expected an object")
    if scheme.get("type") != "float" or scheme.get("num_bits") != 8:
        raise _refuse(where, f"{key}.type", scheme.get("type"),
                      "only an FP8 (8-bit float) KV cache is supported")
    if scheme.get("dynamic", False):
        raise _refuse(where, f"{key}.dynamic", scheme.get("dynamic"),
                      "kiln's FP8 KV cache needs static scales stored in the checkpoint")
    # Per attention head: kiln keeps one scale a layer, the heads' largest (every head stays
    # in E4M3's range; smaller heads lose a little resolution).
    if scheme.get("strategy", "tensor") not in ("tensor", "attn_head"):
        raise _refuse(where, f"{key}.strategy", scheme.get("strategy"),
                      "expected tensor or attn_head")
    return "fp8"


def _kv_scales(source: TensorSource, config: dict, where: str) -> tuple[tuple[float, float], ...]:
    """Each decoder layer's (k_scale, v_scale) from a checkpoint whose config declares an FP8
    KV cache: every layer must have both, positive and finite (the cache stores k / k_scale)."""
    found: dict[int, dict[str, str]] = {}
    for name in source.names():
        match = _KV_SCALE.match(name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2) or match.group(3)] = name
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        layers = max(found, default=-1) + 1
    scales = []
    for layer in range(layers):
        pair = []
        for kind in "kv":
            name = found.get(layer, {}).get(kind)
            if name is None:
                raise CheckpointError(
                    f"{where} declares an FP8 KV cache, but layer {layer} has no {kind}_scale "
                    f"tensor (layers.{layer}.self_attn.{kind}_scale or "
                    f"layers.{layer}.self_attn.{kind}_proj.{kind}_scale)")
            scale = _checked(name, source.get(name), dtypes=_FLOAT_SCALES, finite=True).float()
            if scale.numel() == 0 or bool((scale <= 0).any()):
                shown = scale.flatten()[:4].tolist()
                raise CheckpointError(f"tensor {name} = {shown}: expected positive KV-cache "
                                      "scales (the cache stores k / k_scale)")
            pair.append(float(scale.max()))
        scales.append(tuple(pair))
    return tuple(scales)


# ─── the converting tensor source ───────────────────────────────────────────────────────


@dataclass
class QuantizedTensors:
    """TensorSource over a quantised checkpoint: full-precision tensors as they are, each
    quantised linear's tensors converted to the contract layout (names: module + contract
    name)."""

    source: TensorSource
    converter: _Converter
    _outputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # name → (module, output)
    _plain: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = set(self.source.names())
        self.converter.available.update(names)
        modules = sorted({n[: -len(self.converter.marker) - 1] for n in names
                          if n.endswith("." + self.converter.marker) and _LINEAR.match(n)})
        owned: set[str] = set()
        for module in modules:
            for suffix in self.converter.needs:
                if f"{module}.{suffix}" not in names:
                    raise CheckpointError(
                        f"checkpoint has {module}.{self.converter.marker} but no "
                        f"{module}.{suffix} ({self.converter.where} says the layer is quantised)"
                    )
            owned.update(f"{module}.{s}" for s in self.converter.needs + self.converter.dropped)
            for output in self.converter.outputs:
                self._outputs[f"{module}.{output}"] = (module, output)
        self.quantized_modules = modules
        dropped = tuple("." + s for s in self.converter.dropped)
        # KV-cache scales are no model tensor: the build reads them (CheckpointQuantization).
        self._plain = [n for n in self.source.names() if n not in owned
                       and not n.endswith(dropped) and not _KV_SCALE.match(n)]

    def names(self) -> list[str]:
        return self._plain + list(self._outputs)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._outputs:
            return tuple(self.get(name).shape)
        return self.source.shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._outputs:
            return self.source.get(name)
        module, output = self._outputs[name]
        return self.converter.outputs[output](self.source.get, module).contiguous()

    def unquantized_layers(self) -> tuple[str, ...]:
        """kiln layer prefixes of decoder linears the checkpoint keeps in full precision
        (a fused layer must be all quantised or all not)."""
        plain = {m.group(1) for n in self._plain if n.endswith(".weight")
                 for m in [_LINEAR.match(n)] if m}
        quantized = set(self.quantized_modules)
        layers = set()
        for module in plain:
            prefix, _, leaf = module.rpartition(".")
            fused = FUSED_PROJECTIONS.get(leaf)
            if fused is None:
                layers.add(module)
                continue
            siblings = [f"{prefix}.{p}" for p, f in FUSED_PROJECTIONS.items() if f == fused]
            if any(s in quantized for s in siblings):
                raise CheckpointError(f"checkpoint keeps {module} unquantised but quantises a "
                                      f"layer fused with it ({fused}); kiln cannot mix them")
            layers.add(f"{prefix}.{fused}")
        return tuple(sorted(layers))


def quantized_source(
    directory: Path, config: dict, source: TensorSource | None
) -> tuple[CheckpointQuantization | None, TensorSource | None]:
    """(the checkpoint's quantisation, its converting tensor source) — (None, source) for a
    full-precision checkpoint."""
    found = detect(directory, config)
    if found is None:
        return None, source
    quant, converter = found
    if source is None:  # config only (random weights): nothing to convert
        return quant, None
    tensors = QuantizedTensors(source, converter)
    if not tensors.quantized_modules:
        raise CheckpointError(f"{converter.where} says the checkpoint is quantised, but no "
                              f"tensor ends in .{converter.marker} on a linear layer")
    unquantized = tensors.unquantized_layers()
    if unquantized:
        quant = dataclasses.replace(quant, unquantized_layers=unquantized)
    if quant.kv_cache is not None:
        quant = dataclasses.replace(quant, kv_scales=_kv_scales(tensors.source, config,
                                                                converter.where))
    return quant, tensors
