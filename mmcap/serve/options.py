"""A request's options: `GenerationConfig`'s fields, parsed from form text or JSON values and
bounded for a shared service, plus `attention` (also return the words and their attention maps)."""
from __future__ import annotations

import argparse
import math
from dataclasses import fields
from typing import Any, Callable, Mapping

from mmcap.generation.config import GenerationConfig, option_type

GENERATION_OPTIONS = [f.name for f in fields(GenerationConfig) if f.name != "use_cache"]
ATTENTION = "attention"
OPTIONS = GENERATION_OPTIONS + [ATTENTION]
# One request must not hold a shared model for long: every beam costs time and memory per step.
MAX_BEAMS = 8


class OptionError(ValueError):
    """An option that is unknown, malformed or out of range (answered with a 422)."""

    def __init__(self, name: str, detail: str):
        self.name = name
        super().__init__(f"{name}: {detail}")


def parse_options(raw: Mapping[str, Any], defaults: GenerationConfig, max_new_tokens: int) -> tuple[GenerationConfig, bool]:
    """The generation options (`defaults` updated with the request's values) and whether
    attention maps were asked for. `raw` holds form text or JSON values; None means unset."""
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise OptionError(unknown[0], f"unknown option; known: {', '.join(OPTIONS)}")
    values = {name: _value(name, value) for name, value in raw.items() if value is not None}
    attention = values.pop(ATTENTION, False)
    if values.get("num_beams", 1) > MAX_BEAMS:
        raise OptionError("num_beams", f"at most {MAX_BEAMS}")
    for name in ("max_new_tokens", "min_new_tokens"):
        if values.get(name, 0) > max_new_tokens:
            raise OptionError(name, f"at most {max_new_tokens} (the decoder's positions)")
    try:
        return defaults.updated(**values), attention
    except ValueError as e:  # GenerationConfig's own checks: lower bounds, combinations
        raise OptionError(", ".join(values) or "options", str(e)) from None


def _parser(name: str) -> Callable[[str], Any]:
    return option_type("do_sample" if name == ATTENTION else name)  # attention is a flag like do_sample


def _kind(name: str) -> type:
    """bool, int or float: what the option's parser makes of text (early_stopping counts as bool)."""
    parse = _parser(name)
    return parse if parse in (int, float) else bool


def _value(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = _parser(name)(value.strip())
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise OptionError(name, f"cannot parse {value!r}: {e}") from None
    kind = _kind(name)
    if kind is bool and not (isinstance(value, bool) or (name == "early_stopping" and value == "never")):
        raise OptionError(name, f"expected true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise OptionError(name, f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OptionError(name, f"expected a finite number, got {value!r}")
        value = float(value)
    return value


def options_schema() -> dict:
    """JSON-schema properties of the options, for the OpenAPI description of `POST /caption`."""
    json_types = {bool: "boolean", int: "integer", float: "number"}
    props = {name: {"type": json_types[_kind(name)]} for name in OPTIONS}
    props["early_stopping"] = {"anyOf": [{"type": "boolean"}, {"enum": ["never"]}]}
    props["num_beams"]["maximum"] = MAX_BEAMS
    props[ATTENTION]["description"] = "also return the generated words and each word's attention grid"
    return props
