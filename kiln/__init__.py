"""kiln: build a Hugging Face model into an optimised engine, then serve it fast."""

from kiln.version import __version__
from kiln.config import BuildConfig, EngineConfig
from kiln.entrypoints import LLM
from kiln.runtime.request_output import CompletionOutput, RequestOutput
from kiln.runtime.sampling_params import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "BuildConfig", "EngineConfig", "RequestOutput", "CompletionOutput",
    "__version__",
]
