"""Step messages (messages.py) to bytes and back, for a runner in another process.

msgpack, never pickle (RELIABILITY.md): decoding builds only the message classes listed
here, through their constructors (SamplingParams validates again), so bytes from a peer can
never name a class or run code. Dataclasses and tuples travel as msgpack extension types so
that a message decodes to one equal to what was encoded, field types included:

    ext 1  [class name, {field: value}]     a message dataclass
    ext 2  [items]                          a tuple (lists stay lists)
"""

from __future__ import annotations

import dataclasses

import msgpack

from kiln.runtime.messages import (
    ModelRunnerOutput,
    NewRequest,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from kiln.runtime.sampling_params import SamplingParams

_MESSAGE_CLASSES = {
    cls.__name__: cls
    for cls in (NewRequest, ScheduledRequest, SchedulerOutput, TokenLogprobs,
                ModelRunnerOutput, SamplingParams)
}
_DATACLASS = 1
_TUPLE = 2


def encode(message) -> bytes:
    """A step message (or anything made of message classes, tuples, lists, dicts with
    string keys, str, int, float, bool and None) as msgpack bytes."""
    return msgpack.packb(message, default=_default, strict_types=True)


class MessageDecodeError(ValueError):
    """Bytes that are not a step message, with the reason."""


def decode(data: bytes):
    """The message `encode` wrote. Raises MessageDecodeError (a ValueError) for bytes that
    are not one."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=True)
    except MessageDecodeError:
        raise
    except Exception as error:  # msgpack's own errors (some carry no message)
        reason = str(error) or type(error).__name__
        raise MessageDecodeError(f"not a kiln step message: {reason}") from None


def _default(obj):
    cls = type(obj)
    if _MESSAGE_CLASSES.get(cls.__name__) is cls:
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return msgpack.ExtType(_DATACLASS, encode([cls.__name__, fields]))
    if cls is tuple:
        return msgpack.ExtType(_TUPLE, encode(list(obj)))
    raise TypeError(f"{cls.__name__} cannot travel in a step message")


def _ext_hook(code: int, data: bytes):
    if code == _TUPLE:
        return tuple(decode(data))
    if code != _DATACLASS:
        raise MessageDecodeError(f"unknown msgpack extension type {code}")
    name, fields = decode(data)
    cls = _MESSAGE_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None or not isinstance(fields, dict):
        raise MessageDecodeError(f"{name!r} is not a step message class")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as error:  # unknown fields, or values that fail validation
        raise MessageDecodeError(f"bad fields for {name}: {error}") from None
