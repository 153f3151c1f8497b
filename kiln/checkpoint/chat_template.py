"""Chat templates rendered in Jinja's immutable sandbox, within a time and a size budget.

The sandbox stops a template from reaching Python internals (`__class__.__mro__`,
`cycler.__init__.__globals__`); it does not stop a template from looping for hours or
building a gigabyte string. The budget closes that:

- time: while the template runs, a per-thread trace function counts the lines executed in
  template code and raises once the deadline has passed, so even a nested loop with an
  empty body stops within the budget;
- size: the output is consumed chunk by chunk (`Template.generate`) and counted; and every
  way a template can build a big value in one Python call is checked *before* the call:
  every arithmetic operator (`'x' * 10**10`, `((10**1000)**1000)**10`: integers are held
  to MAX_INT_BITS), string concatenation (`+`, `~`, `join`, block captures), `%`-formatting
  and `str.format` widths (`'%0300000000d' % 1`), filter arguments (`center(10**9)`,
  `indent`, `replace`), each against the same size limit as the output;
- globals: only what real chat templates use (`range`, bounded by the sandbox, `dict`,
  `namespace`, `raise_exception`, `strftime_now`); Jinja's `lipsum`, `cycler` and `joiner`
  are gone (`lipsum(40000, ...)` ran in Python, outside the time check).

The same limits hold for an engine's own template and for one sent with a request.

Rendering blocks, so the server calls `render_chat` in a worker thread.
"""

from __future__ import annotations

import functools
import json
import re
import string
import sys
import time
from datetime import datetime
from types import FrameType
from typing import Any, Callable

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Jinja gives compiled template code this file name.
_TEMPLATE_FILENAME = "<template>"
# Check the clock every this many template lines: the check is cheap, not free.
_LINES_PER_CLOCK_CHECK = 256
MAX_FILTER_INT = 100_000
# Largest integer a template may compute (bits): far past any index or count a template needs.
MAX_INT_BITS = 4096
# Largest width or precision in a format spec ('%10d', '{:>10}').
MAX_FORMAT_WIDTH = 1000
# tojson(indent=...) beyond this only makes the prompt longer.
MAX_JSON_INDENT = 16
# Jinja's default globals that no chat template uses; lipsum also runs outside the time check.
_REMOVED_GLOBALS = ("lipsum", "cycler", "joiner")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_NUMBER = re.compile(r"\d+")


class TemplateError(ValueError):
    """The template failed, tried something unsafe, or ran out of budget."""


class _BudgetExceeded(Exception):
    """The template ran past its time or size budget."""


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to the environment's bounded join instead of a plain one."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_join((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.max_chars = max_chars
        for name in _REMOVED_GLOBALS:
            self.globals.pop(name, None)
        for name, function in list(self.filters.items()):
            self.filters[name] = _bounded_filter(name, function, max_chars)
        self.filters["tojson"] = _bounded_filter("tojson", _tojson, max_chars)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt)[:MAX_FORMAT_WIDTH])
        # Block captures (`{% set x %}...{% endset %}`), macros and call blocks join through this.
        self.concat = self.bounded_concat

    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise _BudgetExceeded(f"{what} would exceed the size limit of {self.max_chars} characters")

    def bounded_concat(self, pieces) -> str:
        pieces = [str(piece) for piece in pieces]
        self._check_size(sum(map(len, pieces)), "a captured block")
        return "".join(pieces)

    def bounded_join(self, values: tuple) -> str:
        return self.bounded_concat(values)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_operands(self, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise _BudgetExceeded(f"an integer result is over {MAX_INT_BITS} bits")
        if isinstance(result, (str, list, tuple)):
            self._check_size(len(result), "a value")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # str.format / format_map, as the sandbox routes them: bound every spec's numbers.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = value.__self__

        def checked(*args, **kwargs) -> str:
            for _, _, spec, _ in string.Formatter().parse(text):
                _check_format_spec(spec or "")
            return wrapped(*args, **kwargs)

        return checked


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_operands(environment: _BudgetedEnvironment, operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too big, before Python computes it."""
    if operator == "**" and _int(left) and _int(right) and right > 0:
        if max(left.bit_length(), 1) * right > MAX_INT_BITS:
            raise _BudgetExceeded(f"{left.bit_length()}-bit integer to the power {right} is over "
                                  f"{MAX_INT_BITS} bits")
    elif operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_INT_BITS:
        raise _BudgetExceeded(f"exponent {right!r} is over the limit {MAX_INT_BITS}")
    if operator == "*":
        if _int(left) and _int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _BudgetExceeded(f"an integer product is over {MAX_INT_BITS} bits")
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, (str, list, tuple)) and _int(count):
                environment._check_size(len(sequence) * max(count, 0), "a repeated string or list")
    if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        environment._check_size(len(left) + len(right), "a concatenation")
    if operator == "%" and isinstance(left, str):
        _check_percent_format(left)


def _check_percent_format(text: str) -> None:
    for match in _PERCENT_SPEC.finditer(text):
        for number in match.groups():
            if number == "*":
                raise _BudgetExceeded("'*' widths in % formatting are not allowed")
            if number is not None and int(number) > MAX_FORMAT_WIDTH:
                raise _BudgetExceeded(f"format width {number} is over the limit {MAX_FORMAT_WIDTH}")


def _check_format_spec(spec: str) -> None:
    if "{" in spec:
        raise _BudgetExceeded("nested fields in format specs are not allowed")
    for number in _NUMBER.findall(spec):
        if int(number) > MAX_FORMAT_WIDTH:
            raise _BudgetExceeded(f"format width {number} is over the limit {MAX_FORMAT_WIDTH}")


def _tojson(value, indent=None) -> str:
    if indent is not None and (not _int(indent) or not 0 <= indent <= MAX_JSON_INDENT):
        raise _BudgetExceeded(f"tojson indent must be an int in [0, {MAX_JSON_INDENT}]")
    return json.dumps(value, indent=indent)


def _estimated_size(name: str, value: Any, args: tuple, kwargs: dict) -> int:
    """An upper bound on the size of a string filter's result, from its arguments."""
    text = value if isinstance(value, str) else None
    if name == "replace" and text is not None and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        occurrences = text.count(old) if old else len(text) + 1
        return len(text) + occurrences * len(new)
    if name == "join" and isinstance(value, (list, tuple)):
        separator = str(args[0]) if args else str(kwargs.get("d", ""))
        return sum(len(item) if isinstance(item, str) else 64 for item in value) \
            + len(separator) * len(value)
    if name == "format" and text is not None:
        _check_percent_format(text)
    widths = [a for a in (*args, *kwargs.values()) if _int(a)]
    if text is not None and widths:
        return len(text) + (text.count("\n") + 1) * max(max(widths), 0)
    return 0


def _bounded_filter(name: str, function: Callable, max_chars: int) -> Callable:
    # Filters are called directly by compiled code (not through the sandbox's `call`), so the
    # bound goes on each filter: its arguments before the call, its result after.
    passes_context = hasattr(function, "jinja_pass_arg")  # called as f(context, value, ...)

    def bounded(*call_args, **kwargs):
        if passes_context:
            value, args = call_args[1], call_args[2:]
        else:
            value, args = call_args[0], call_args[1:]
        for argument in (*args, *kwargs.values()):
            if _int(argument) and abs(argument) > MAX_FILTER_INT:
                raise _BudgetExceeded(f"filter argument {argument} is over the limit {MAX_FILTER_INT}")
        if _estimated_size(name, value, args, kwargs) > max_chars:
            raise _BudgetExceeded(f"the {name} filter's result would exceed the size limit of "
                                  f"{max_chars} characters")
        result = function(*call_args, **kwargs)
        if isinstance(result, (str, list, tuple)) and len(result) > max_chars:
            raise _BudgetExceeded(f"the {name} filter's result exceeds the size limit")
        return result

    for attribute in ("jinja_pass_arg",):  # keep pass_context / pass_environment markers
        if hasattr(function, attribute):
            setattr(bounded, attribute, getattr(function, attribute))
    return bounded


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


class _Deadline:
    """A trace function that raises in template code once `deadline` has passed."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.lines = 0

    def global_trace(self, frame: FrameType, event: str, arg: Any):
        # Only template frames get line tracing; everything else runs untraced.
        if frame.f_code.co_filename == _TEMPLATE_FILENAME:
            return self.local_trace
        return None

    def local_trace(self, frame: FrameType, event: str, arg: Any):
        if event == "line":
            self.lines += 1
            if self.lines % _LINES_PER_CLOCK_CHECK == 0 and time.monotonic() > self.deadline:
                raise _BudgetExceeded("chat template ran past its time budget")
        return self.local_trace


@functools.lru_cache(maxsize=16)
def _compile(template: str, max_chars: int) -> jinja2.Template:
    # Compiling costs milliseconds, rendering microseconds: the engine's own template is
    # compiled once. Compiled templates are immutable and safe to share between threads.
    return _BudgetedEnvironment(max_chars).from_string(template)


def render_chat(
    template: str,
    messages: list[dict],
    *,
    special_tokens: dict[str, str] | None = None,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    time_budget_s: float = 1.0,
    max_chars: int = 1 << 20,
) -> str:
    """Render `messages` with `template`; TemplateError (a ValueError) on any failure.

    `tools` (OpenAI tool definitions, `{"type": "function", "function": {...}}`) is the
    template's `tools` variable, as Hugging Face templates expect; None when the request has
    none (templates test `tools is not none` or `if tools`)."""
    deadline = _Deadline(time_budget_s)
    previous = sys.gettrace()
    sys.settrace(deadline.global_trace)
    try:
        compiled = _compile(template, max_chars)
        pieces: list[str] = []
        size = 0
        for piece in compiled.generate(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            **(special_tokens or {})
        ):
            size += len(piece)
            if size > max_chars:
                raise _BudgetExceeded(f"chat template output is over {max_chars} characters")
            pieces.append(piece)
    except _BudgetExceeded as error:
        raise TemplateError(str(error)) from None
    except jinja2.exceptions.SecurityError as error:
        raise TemplateError(f"chat template tried an unsafe operation: {error}") from None
    except jinja2.exceptions.TemplateError as error:
        raise TemplateError(f"chat template failed: {error}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError,
            RecursionError, OverflowError, MemoryError) as error:
        raise TemplateError(f"chat template failed: {type(error).__name__}: {error}") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)
