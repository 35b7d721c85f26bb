"""`GenerationConfig`: the one declaration of caption decoding options.

Names, meanings and defaults follow `transformers.GenerationConfig`. Everything that decodes
derives its options from these fields: `Captioner.caption` keywords, the `--num-beams`-style
options of `mmcap caption` and `mmcap eval` (`add_generation_arguments`), a recipe's
`model.generation` block, and a saved model's `generation_config.json`, which holds the
model's own defaults (as in transformers). No torch import here: CLIs parse without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class GenerationConfig:
    # None: the model's `max_caption_tokens` (the longest caption it was trained on, EOS included).
    max_new_tokens: Optional[int] = None
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    # True: stop a beam search once num_beams captions are finished; False: a heuristic; "never": exact.
    early_stopping: Union[bool, str] = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # 0: no top-k filtering
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens cannot exceed max_new_tokens")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationConfig":
        """From keyword arguments, naming the unknown ones (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown generation arguments {sorted(unknown)}; known: {sorted(known)}")
        return cls(**kwargs)

    @classmethod
    def coerce(cls, value: Union["GenerationConfig", dict, None]) -> "GenerationConfig":
        """A config from a config, a dict (YAML, JSON) or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        return cls.from_kwargs(**dict(value))

    def updated(self, **overrides) -> "GenerationConfig":
        """A copy with `overrides` (keyword arguments of a call) applied; None values are ignored."""
        return GenerationConfig.from_kwargs(**{**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})

    def resolved(self, max_caption_tokens: int) -> "GenerationConfig":
        """`max_new_tokens` filled in from the model when unset."""
        if self.max_new_tokens is not None:
            return self
        return dataclasses.replace(self, max_new_tokens=max(max_caption_tokens, self.min_new_tokens, 1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- a model directory's generation_config.json ----
    def save(self, directory: Union[str, os.PathLike]) -> None:
        """Write `generation_config.json` atomically (temporary file, then rename)."""
        directory = Path(directory)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, directory / GENERATION_CONFIG_FILE)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "GenerationConfig":
        """A model directory's defaults; the library defaults where it has none (saved by 0.1)."""
        path = Path(directory) / GENERATION_CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls.from_kwargs(**{k: v for k, v in data.items() if not k.startswith("_")})
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid generation config: {e}") from None


# ---- command-line options, derived from the fields ----

_HELP = {
    "max_new_tokens": "longest caption in tokens (default: the model's max_caption_tokens)",
    "num_beams": "beam search width (1: greedy or sampling)",
    "early_stopping": "true, false or never",
    "top_k": "sample from the k most likely tokens (0: all)",
}


def _parse_early_stopping(text: str) -> Union[bool, str]:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "never":
        return "never"
    raise argparse.ArgumentTypeError(f"expected true, false or never, got {text!r}")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--option-name` (and `--option_name`) per `GenerationConfig` field. Every default is
    None: what the user leaves unset comes from the model's own `generation_config.json`."""
    group = parser.add_argument_group("generation (defaults: the model's generation_config.json)")
    for f in fields(GenerationConfig):
        if f.name == "use_cache":
            continue
        dashed, underscored = f"--{f.name.replace('_', '-')}", f"--{f.name}"
        names = [dashed] if dashed == underscored else [dashed, underscored]
        default = GenerationConfig.__dataclass_fields__[f.name].default
        kind = option_type(f.name)
        if kind is _parse_bool:
            # `--do-sample` alone means true, as before; `--do-sample false` is accepted too
            group.add_argument(*names, dest=f.name, type=kind, nargs="?", const=True, default=None,
                               help=_HELP.get(f.name, f"default {default}"))
            continue
        group.add_argument(*names, dest=f.name, type=kind, default=None,
                           help=_HELP.get(f.name, f"transformers' {f.name}"))


def option_type(name: str) -> Callable[[str], Any]:
    """The parser of one generation option's text (a command-line value, a form field); it
    raises `argparse.ArgumentTypeError` or `ValueError` for text that does not parse."""
    default = GenerationConfig.__dataclass_fields__[name].default
    if name == "early_stopping":
        return _parse_early_stopping
    if isinstance(default, bool):
        return _parse_bool
    if name == "max_new_tokens" or isinstance(default, int):
        return int
    return float


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options given on the command line (the ones left unset are absent)."""
    return {f.name: getattr(args, f.name) for f in fields(GenerationConfig)
            if getattr(args, f.name, None) is not None}
