"""User-facing configuration, validated at the edge with messages a person can act on."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.errors import KilnError

DTYPES = ("bfloat16", "float16", "float32")


class BuildConfig(BaseModel):
    """How `kiln build` turns a checkpoint into an engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="weight and activation dtype of the engine"
    )
    max_model_len: int | None = Field(
        None, ge=1, description="longest sequence (prompt + output) the engine serves; "
        "defaults to the model's max_position_embeddings"
    )
    random_weights: bool = Field(
        False, description="fill weights with random values (benchmark engines; no checkpoint)"
    )
    seed: int = Field(0, description="seed for --random-weights")


def validated(cls: type[BaseModel], **values) -> BaseModel:
    """Build a pydantic config, turning validation errors into one readable KilnError."""
    try:
        return cls(**values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}"
            f" (got {e.get('input')!r})"
            for e in error.errors()
        )
        raise KilnError(f"invalid {cls.__name__}: {problems}") from None
