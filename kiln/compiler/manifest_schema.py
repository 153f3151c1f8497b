"""The engine manifest's schema: engine.json is untrusted input, checked as a whole before any
of it is used, with one line naming the field that is wrong.

    size cap (MAX_MANIFEST_BYTES) ─► nesting cap (MAX_JSON_DEPTH, before json.loads recurses)
    ─► json.loads ─► ManifestSchema (types, ranges, real dtypes)
    ─► the "quant" and "parallel" sections through their own readers (kiln/quant/config.py,
       kiln/parallel/layout.py) and "files" through verify.py, which own those formats.

Known fields are typed and bounded; unknown top-level and "build" fields are kept (an engine
written by a newer kiln may carry more), unknown "model" fields are refused by
ModelConfig.from_dict.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# engine.json of a 405B model split 8 ways is ~250 KB; anything near this is not a manifest.
MAX_MANIFEST_BYTES = 16 * 2**20
# The deepest real nesting is files → entry → chunks → sha256 list (5).
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")

_Count = Field(ge=1, le=1 << 24)


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class ModelSection(_Section):
    architecture: str = Field(min_length=1, max_length=128)
    vocab_size: int = Field(ge=1, le=1 << 24)
    hidden_size: int = Field(ge=1, le=1 << 20)
    intermediate_size: int = Field(ge=1, le=1 << 22)
    num_layers: int = Field(ge=1, le=4096)
    num_heads: int = Field(ge=1, le=1 << 16)
    num_kv_heads: int = Field(ge=1, le=1 << 16)
    head_dim: int = Field(ge=1, le=1 << 16)
    max_position_embeddings: int = _Count
    norm_eps: float = Field(gt=0, lt=1)
    hidden_act: str = Field("silu", max_length=64)
    tie_word_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: list[int | None] = Field(default_factory=list, max_length=4096)
    bos_token_id: int | None = Field(None, ge=0, le=1 << 24)
    eos_token_ids: list[int] = Field(default_factory=list, max_length=1024)


class BuildSection(_Section):
    dtype: Literal["bfloat16", "float16", "float32"]
    max_model_len: int = _Count


class ManifestSchema(_Section):
    format: Literal["kiln-engine"]
    format_version: int = Field(ge=1)
    kiln_version: str | None = Field(None, max_length=64)
    architecture: str = Field(min_length=1, max_length=128)
    model: ModelSection
    build: BuildSection
    # Checked by quant_config_from_manifest and EngineLayout.from_manifest (open_engine).
    quant: dict[str, Any] | None = None
    parallel: dict[str, Any] | None = None
    generation_config: dict[str, Any] = Field(default_factory=dict)
    # Checked entry by entry by verify.py.
    files: dict[str, dict[str, Any]]
    source: dict[str, Any] = Field(default_factory=dict)
    tuning: dict[str, Any] = Field(default_factory=dict)


def json_depth(text: str) -> int:
    """How deeply `text`'s arrays and objects nest, without parsing it (strings skipped)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def first_problem(error: ValidationError) -> str:
    """One line: the first wrong field, by its dotted path, and what is wrong with it."""
    item = error.errors()[0]
    field = ".".join(str(part) for part in item.get("loc", ())) or "(top level)"
    value = item.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r:.60})"
    more = len(error.errors()) - 1
    return f"field '{field}': {item.get('msg', 'invalid')}{shown}" + (
        f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
