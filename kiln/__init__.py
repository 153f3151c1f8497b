"""kiln: build a Hugging Face model into an optimised engine, then serve it fast."""

__version__ = "0.1.0"
