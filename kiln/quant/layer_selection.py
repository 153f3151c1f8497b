"""`kiln build --unquantized-layers`: the linears a quantising scheme leaves in the compute
dtype, chosen by name, by a prefix of names or by glob pattern (TensorRT-LLM's
`exclude_modules`, llm-compressor's `ignore`). The build resolves the patterns once against
the model's own layer names, so the manifest records exact names, and a pattern that matches
nothing is refused instead of leaving the engine quietly quantised everywhere.

    model.layers.11.mlp.down_proj      one layer
    model.layers.0                     every linear of decoder layer 0
    model.layers.*.self_attn.qkv_proj  a glob (fnmatch: * also crosses dots)
"""

from __future__ import annotations

from fnmatch import fnmatchcase

# Hugging Face linear names kiln fuses into one layer, quantised whole or not at all.
FUSED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def layer_matches(name: str, pattern: str) -> bool:
    """Whether layer `name` is `pattern`, lies under it (pattern + '.'), or fits its glob."""
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def select_layers(patterns: list[str] | tuple[str, ...], layer_names: list[str]) -> tuple[str, ...]:
    """The names in `layer_names` (model order) that any pattern selects. Raises ValueError
    naming a pattern that selects none, with what the model's layers are called."""
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [name for name in layer_names if layer_matches(name, pattern)]
        if not matched:
            raise ValueError(_matches_nothing(pattern, layer_names))
        chosen.update(matched)
    return tuple(name for name in layer_names if name in chosen)


def _matches_nothing(pattern: str, layer_names: list[str]) -> str:
    where, _, leaf = pattern.rpartition(".")
    if leaf in FUSED_NAMES:
        fused = f"{where}.{FUSED_NAMES[leaf]}" if where else FUSED_NAMES[leaf]
        return (f"--unquantized-layers {pattern!r}: kiln fuses q_proj, k_proj and v_proj into "
                f"qkv_proj (gate_proj and up_proj into gate_up_proj) and quantises a fused "
                f"layer whole; name {fused!r}")
    examples = ", ".join(layer_names[:4])
    return (f"--unquantized-layers {pattern!r} matches none of this model's "
            f"{len(layer_names)} quantisable layers ({examples}, ...); give a layer name, a "
            f"prefix (model.layers.0) or a glob (model.layers.*.mlp.down_proj)")
