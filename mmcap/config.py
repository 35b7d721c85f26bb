"""Typed configs: one dataclass per component, composed into `CaptionerConfig`.

The same structure is what `config.json` of a saved model holds and what the YAML files
under `configs/model/` set, so a model is fully described by plain JSON.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
FREEZE_POINTS = ("none", "stem", "layer1", "layer2", "layer3", "layer4", "all")


@dataclass
class EncoderConfig:
    """torchvision ResNet whose last conv grid becomes the image tokens."""

    arch: str = "resnet50"
    # None (random init), a torchvision weights name such as "IMAGENET1K_V2", or a path to a
    # torchvision state_dict (.pth loaded with weights_only=True, or .safetensors).
    weights: Optional[str] = None
    # Freeze nothing, everything, or every stage up to and including the named one.
    freeze: str = "none"

    def __post_init__(self) -> None:
        if self.arch not in RESNETS:
            raise ValueError(f"encoder.arch must be one of {RESNETS}, got {self.arch!r}")
        if self.freeze not in FREEZE_POINTS:
            raise ValueError(f"encoder.freeze must be one of {FREEZE_POINTS}, got {self.freeze!r}")


@dataclass
class ProjectionConfig:
    """Maps grid features to the decoder width and adds learned 2-D positions."""

    kind: Literal["linear", "mlp"] = "linear"
    # Largest grid (rows and columns) the position table covers: 16 fits 512 px for ResNets.
    max_grid: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"projection.kind must be 'linear' or 'mlp', got {self.kind!r}")


@dataclass
class DecoderConfig:
    """A Hugging Face GPT-2 or BERT language model reading the image through cross-attention.

    With `pretrained` set (hub name or local directory), the size fields are ignored and only
    the cross-attention layers are new; otherwise a small random-init model is built from them.
    """

    family: Literal["gpt2", "bert"] = "gpt2"
    pretrained: Optional[str] = None
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: Optional[int] = None  # default 4 * hidden_size
    max_positions: int = 64
    dropout: float = 0.1
    # Filled in when a model is built or saved: the decoder's full Hugging Face config, so that
    # loading a saved model never needs the hub.
    hf_config: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "bert"):
            raise ValueError(f"decoder.family must be 'gpt2' or 'bert', got {self.family!r}")


@dataclass
class TokenizerConfig:
    """How to train a tokenizer from captions when the decoder is not pretrained."""

    kind: Literal["wordlevel", "bpe"] = "wordlevel"
    vocab_size: int = 8000
    min_frequency: int = 1
    lowercase: bool = True


@dataclass
class CaptionerConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    image_size: int = 224  # eval resolution used by `Captioner.caption`
    max_caption_tokens: int = 40

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaptionerConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)} - {"mmcap_version"}
        if unknown:
            raise ValueError(f"unknown captioner config keys: {sorted(unknown)}")
        parts = {
            "encoder": EncoderConfig,
            "projection": ProjectionConfig,
            "decoder": DecoderConfig,
            "tokenizer": TokenizerConfig,
        }
        kwargs = {}
        for name, typ in parts.items():
            value = d.get(name) or {}
            kwargs[name] = value if isinstance(value, typ) else _build(typ, value, name)
        for name in ("image_size", "max_caption_tokens"):
            if name in d:
                kwargs[name] = int(d[name])
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "CaptionerConfig":
        """Read a JSON or YAML file; YAML files may nest the config under a `model:` key."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if "model" in data and isinstance(data["model"], dict):
            # a training recipe (configs/*.yaml): keep the model part, drop optimisation options
            model = data["model"].get("init_args", data["model"])
            loader = data.get("data") if isinstance(data.get("data"), dict) else {}
            loader = loader.get("init_args", loader)
            data = {k: v for k, v in model.items() if k in {f.name for f in dataclasses.fields(cls)}}
            for name in ("image_size", "max_caption_tokens"):  # the CLI links these from data.*
                if name not in data and name in loader:
                    data[name] = loader[name]
        return cls.from_dict(data)


def _build(typ, value: dict, name: str):
    known = {f.name for f in dataclasses.fields(typ)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"unknown keys in {name} config: {sorted(unknown)}; known: {sorted(known)}")
    return typ(**value)
