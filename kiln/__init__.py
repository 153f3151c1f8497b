"""kiln: build a Hugging Face model into an optimised engine, then serve it fast."""

__version__ = "0.1.0"

from kiln.config import BuildConfig, EngineConfig  # noqa: E402
from kiln.entrypoints import LLM  # noqa: E402
from kiln.runtime.request_output import CompletionOutput, RequestOutput  # noqa: E402
from kiln.runtime.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "BuildConfig", "EngineConfig", "RequestOutput", "CompletionOutput"]
