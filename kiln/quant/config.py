"""Quantisation schemes: a `QuantConfig` is a scheme's name and parameters, picks the
`QuantMethod` of every linear layer from its name, and is what the manifest's "quant"
section stores:

    "quant": {"scheme": "none"}
    "quant": {"scheme": "<name>", "<parameter>": <value>, ...}

Schemes register by name (`@register_quant_scheme`), so a new scheme is a new file in
kiln/quant/ and changes no model and no layer. "none" (plain weights in the model dtype) is
always there.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from kiln.quant.base import QuantMethod, UnquantizedLinearMethod

_SCHEMES: dict[str, type["QuantConfig"]] = {}


@dataclass(frozen=True)
class QuantConfig(abc.ABC):
    """A scheme's parameters (the dataclass fields of a subclass; JSON values: numbers,
    strings, booleans, tuples of them) and its per-layer choice of method."""

    scheme: ClassVar[str]

    @abc.abstractmethod
    def linear_method(self, prefix: str) -> QuantMethod:
        """The method for the linear layer named `prefix` (model.layers.3.mlp.down_proj).
        A scheme may leave layers unquantized by returning UnquantizedLinearMethod."""

    def to_manifest(self) -> dict:
        section = {"scheme": self.scheme}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            section[f.name] = list(value) if isinstance(value, tuple) else value
        return section

    @classmethod
    def from_params(cls, params: dict) -> "QuantConfig":
        """This scheme from the manifest's parameters (JSON lists become tuples). Raises
        ValueError naming an unknown or invalid parameter."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(
                f"scheme {cls.scheme!r} has no parameter {unknown[0]!r}; its parameters: "
                f"{', '.join(fields) or '(none)'}"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:  # a missing field, or __post_init__
            raise ValueError(f"scheme {cls.scheme!r}: {error}") from None


def register_quant_scheme(config_class: type[QuantConfig]) -> type[QuantConfig]:
    """Class decorator: make `config_class.scheme` known to builds and engine loading."""
    name = getattr(config_class, "scheme", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{config_class.__name__} needs a non-empty class attribute 'scheme'")
    registered = _SCHEMES.get(name)
    if registered is not None and registered is not config_class:
        raise ValueError(
            f"quantisation scheme {name!r} is already registered by {registered.__name__}"
        )
    _SCHEMES[name] = config_class
    return config_class


def known_quant_schemes() -> list[str]:
    return sorted(_SCHEMES)


def _unknown_scheme(name: object) -> ValueError:
    return ValueError(
        f"unknown quantisation scheme {name!r}; this kiln knows: {', '.join(known_quant_schemes())}"
    )


def quant_config_for_build(scheme: str, options: dict | None = None) -> QuantConfig:
    """The scheme `kiln build --quant SCHEME` asks for: its defaults, overridden by the
    build flags in `options` (parameter name → value; None = not given). Raises ValueError
    naming a flag the scheme has no use for, or a value it refuses."""
    if scheme not in _SCHEMES:
        raise _unknown_scheme(scheme)
    config_class = _SCHEMES[scheme]
    fields = {f.name for f in dataclasses.fields(config_class)}
    given = {name: value for name, value in (options or {}).items() if value is not None}
    for name in given:
        if name not in fields:
            raise ValueError(
                f"quantisation scheme {scheme!r} takes no {_FLAG_NAMES.get(name, name)}; "
                f"drop the flag or pick a scheme that has it"
            )
    try:
        return config_class(**given)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scheme {scheme!r}: {error}") from None


# Build flags by the scheme parameter they set (for messages).
_FLAG_NAMES = {
    "group_size": "--group-size",
    "activation_scales": "--act-scales",
    "quantize_lm_head": "--quant-lm-head",
    "calibration": "--calibration",
    "calibration_samples": "--calibration-samples",
    "gptq": "--gptq",
    "unquantized_layers": "--unquantized-layers",
}


def quant_config_from_manifest(section: object) -> QuantConfig:
    """The manifest's "quant" section, checked as untrusted input. Raises ValueError naming
    the scheme or field that is wrong and what this kiln knows."""
    if not isinstance(section, dict):
        raise ValueError(f"expected an object with a 'scheme', got {section!r}")
    params = dict(section)
    name = params.pop("scheme", None)
    if not isinstance(name, str):
        raise ValueError(f"'scheme' must be a scheme name, got {name!r}")
    if name not in _SCHEMES:
        raise _unknown_scheme(name)
    return _SCHEMES[name].from_params(params)


_UNQUANTIZED = UnquantizedLinearMethod()


@register_quant_scheme
@dataclass(frozen=True)
class NoQuantization(QuantConfig):
    """Every linear layer keeps a plain weight in the model's dtype."""

    scheme: ClassVar[str] = "none"

    def linear_method(self, prefix: str) -> QuantMethod:
        return _UNQUANTIZED


NO_QUANTIZATION = NoQuantization()


# The schemes in their own files register themselves on import (they import this module).
from kiln.quant import fp8, int4, int8  # noqa: E402,F401
