"""Which producers quantise their output for the FP8 linear that reads it (issue 11).

A model says, per block class, which of its layers' outputs go to one linear and nowhere
else, as data (kiln/models/llama.py, LlamaDecoderLayer):

    fp8_activation_producers = (("input_layernorm", "self_attn.qkv_proj"),
                                ("post_attention_layernorm", "mlp.gate_up_proj"),
                                ("mlp.act", "mlp.down_proj"))

After an engine is loaded (kiln/compiler/loader.py) `fuse_fp8_activations` walks the model and,
for each declared pair whose consumer is an FP8 linear (dynamic, or static with its
input_scale), sets the producer's `quantize_output`: the producer then returns an
Fp8Activation (kiln/quant/fused_activation.py) and the linear skips its own quantisation. The
numbers are the unfused ones exactly (kiln/kernels/fused_quant.py), so this is purely a
saving of kernels and memory traffic. A block class without the declaration is left alone;
a consumer that is not FP8 (bf16, int8-wo, int4-wo, a layer kept unquantised) leaves its
producer alone. The declaration is the model's promise that the output has no other reader
(Qwen3's q/k norms read the q/k/v projection's output, not the input norm's, so they are
not affected); an Fp8Activation reaching anything else fails loudly, it is not a tensor.

Tensor parallelism: each rank fuses its own layers. A column-parallel consumer (qkv_proj,
gate_up_proj) reads the whole hidden row on every rank. The row-parallel down_proj reads the
rank's shard of the intermediate row, so its per-token scale is the shard's amax — but that
is what the unfused down_proj computes too (it quantises the input it gets, the same shard),
and SiLU-and-mul produces exactly that shard: fused and unfused agree at every tp, so the
fusion stays on for row-parallel consumers. (Per-shard scales make a W8A8 engine at tp > 1
differ slightly from tp 1 with or without this fusion.)
"""

from __future__ import annotations

from torch import nn

from kiln.quant.fp8 import Fp8LinearMethod
from kiln.quant.fused_activation import Fp8OutputSpec
from kiln.quant.quantize import FULL_PRECISION

PRODUCERS_ATTRIBUTE = "fp8_activation_producers"


def _output_spec(consumer: nn.Module, consumer_name: str) -> Fp8OutputSpec | None:
    """How to quantise for `consumer`, or None when it is not an FP8 linear ready to run."""
    method = getattr(consumer, "quant_method", None)
    if not isinstance(method, Fp8LinearMethod):
        return None
    if getattr(consumer, FULL_PRECISION, None) is not None:
        return None  # still full precision (a build before quantisation): it runs unquantised
    if method.static and getattr(consumer, "input_scale", None) is None:
        return None
    return Fp8OutputSpec(consumer_name, consumer, static=method.static)


def _declared_module(block: nn.Module, block_name: str, name: str) -> nn.Module:
    try:
        return block.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{type(block).__name__}.{PRODUCERS_ATTRIBUTE} names {name!r}, which "
                         f"{block_name or 'the model'} does not have") from None


def fuse_fp8_activations(model: nn.Module) -> list[tuple[str, str]]:
    """Set `quantize_output` on every declared producer whose consumer is an FP8 linear (and
    clear it everywhere else). Returns the (producer, consumer) module names fused."""
    unfuse_fp8_activations(model)
    fused = []
    for block_name, block in model.named_modules():
        pairs = getattr(type(block), PRODUCERS_ATTRIBUTE, ())
        for producer_name, consumer_name in pairs:
            producer = _declared_module(block, block_name, producer_name)
            consumer = _declared_module(block, block_name, consumer_name)
            if not hasattr(producer, "quantize_output"):
                raise ValueError(f"{type(block).__name__}.{PRODUCERS_ATTRIBUTE}: "
                                 f"{producer_name!r} is a {type(producer).__name__}, which "
                                 f"cannot quantise its output")
            prefix = f"{block_name}." if block_name else ""
            spec = _output_spec(consumer, prefix + consumer_name)
            if spec is not None:
                producer.quantize_output = spec
                fused.append((prefix + producer_name, prefix + consumer_name))
    return fused


def unfuse_fp8_activations(model: nn.Module) -> None:
    """Every producer back to writing its output in the compute dtype."""
    for module in model.modules():
        if getattr(module, "quantize_output", None) is not None:
            module.quantize_output = None
