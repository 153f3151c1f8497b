"""Errors a user can act on.

A `KilnError` means the input (a file, a flag, a config) is wrong, not kiln: the CLI prints
its message on one line and exits non-zero without a traceback. Messages name the thing
that is wrong (file, tensor, field) and, where it helps, what was expected and what was found.
"""


class KilnError(Exception):
    """A user-facing error: bad input, bad file, bad configuration."""


class CheckpointError(KilnError):
    """A checkpoint (HF directory, safetensors, GGUF) is missing, malformed or inconsistent."""


class EngineFormatError(KilnError):
    """An engine directory is missing, corrupt, or from an incompatible kiln version."""
