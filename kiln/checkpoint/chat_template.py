"""Chat templates rendered in Jinja's immutable sandbox, within a time and a size budget.

The sandbox stops a template from reaching Python internals (`__class__.__mro__`,
`cycler.__init__.__globals__`); it does not stop a template from looping for hours or
building a gigabyte string. The budget closes that:

- time: while the template runs, a per-thread trace function counts the lines executed in
  template code and raises once the deadline has passed, so even a nested loop with an
  empty body stops within the budget;
- size: the output is consumed chunk by chunk (`Template.generate`) and counted; `*` and `**`
  are intercepted so `'x' * 10**10` fails before it allocates; integer arguments to filters
  (`center(10**9)`) are bounded.

Rendering blocks, so the server calls `render_chat` in a worker thread.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from datetime import datetime
from types import FrameType
from typing import Any, Callable

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Jinja gives compiled template code this file name.
_TEMPLATE_FILENAME = "<template>"
# Check the clock every this many template lines: the check is cheap, not free.
_LINES_PER_CLOCK_CHECK = 256
MAX_FILTER_INT = 100_000
MAX_POWER_EXPONENT = 1024


class TemplateError(ValueError):
    """The template failed, tried something unsafe, or ran out of budget."""


class _BudgetExceeded(Exception):
    """The template ran past its time or size budget."""


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.max_chars = max_chars
        for name, function in list(self.filters.items()):
            self.filters[name] = _bounded_filter(function)
        self.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                    if len(sequence) * max(count, 0) > self.max_chars:
                        raise _BudgetExceeded("a repeated string or list would exceed the size limit")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER_EXPONENT:
            raise _BudgetExceeded(f"exponent {right!r} is over the limit {MAX_POWER_EXPONENT}")
        return super().call_binop(context, operator, left, right)


def _bounded_filter(function: Callable) -> Callable:
    # Filters are called directly by compiled code (not through the sandbox's `call`), so the
    # bound goes on each filter: its value is not checked, only the extra arguments.
    def bounded(value, *args, **kwargs):
        for argument in (*args, *kwargs.values()):
            if isinstance(argument, int) and not isinstance(argument, bool) and abs(argument) > MAX_FILTER_INT:
                raise _BudgetExceeded(f"filter argument {argument} is over the limit {MAX_FILTER_INT}")
        return function(value, *args, **kwargs)

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
    time_budget_s: float = 1.0,
    max_chars: int = 1 << 20,
) -> str:
    """Render `messages` with `template`; TemplateError (a ValueError) on any failure."""
    deadline = _Deadline(time_budget_s)
    previous = sys.gettrace()
    sys.settrace(deadline.global_trace)
    try:
        compiled = _compile(template, max_chars)
        pieces: list[str] = []
        size = 0
        for piece in compiled.generate(
            messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {})
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
