"""Architectures by Hugging Face name: `@register_model("LlamaForCausalLM", ...)`."""

from __future__ import annotations

from kiln.errors import CheckpointError

_MODELS: dict[str, type] = {}


def register_model(*architectures: str):
    def wrap(cls: type) -> type:
        for name in architectures:
            _MODELS[name] = cls
        return cls

    return wrap


def get_model_class(architecture: str) -> type:
    _import_all()
    if architecture not in _MODELS:
        raise CheckpointError(
            f"unsupported architecture {architecture!r}; supported: "
            + ", ".join(sorted(_MODELS))
        )
    return _MODELS[architecture]


def _import_all() -> None:
    # Model modules register themselves on import.
    from kiln.models import gpt2, llama  # noqa: F401
