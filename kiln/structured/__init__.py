"""Structured outputs: constrain generation to a JSON schema, regex, choice list or EBNF grammar.

`params.StructuredOutputsParams` is what a request asks for. The grammar engine (xgrammar) is
an optional dependency (`pip install 'kiln[structured]'`); kiln imports without it.
"""

from kiln.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
