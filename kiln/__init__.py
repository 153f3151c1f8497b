"""kiln: build a Hugging Face model into an optimised engine, then serve it fast."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kiln.version import __version__

if TYPE_CHECKING:
    from kiln.config import BuildConfig, EngineConfig
    from kiln.entrypoints import LLM
    from kiln.runtime.request_output import CompletionOutput, RequestOutput
    from kiln.runtime.sampling_params import SamplingParams
    from kiln.structured.params import StructuredOutputsParams

# The package's face is imported on first use (PEP 562), not with the package: `kiln --help`
# must not pay for torch and transformers (~2.5 s) just because kiln.cli lives in here.
_LAZY = {
    "LLM": "kiln.entrypoints", "SamplingParams": "kiln.runtime.sampling_params",
    "BuildConfig": "kiln.config", "EngineConfig": "kiln.config",
    "RequestOutput": "kiln.runtime.request_output", "CompletionOutput": "kiln.runtime.request_output",
    "StructuredOutputsParams": "kiln.structured.params",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
