"""Typed configs: one dataclass per component, composed into `CaptionerConfig`.

The same structure is what `config.json` of a saved model holds and what the YAML files
under `configs/model/` set, so a model is fully described by plain JSON.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
FREEZE_POINTS = ("none", "stem", "layer1", "layer2", "layer3", "layer4", "all")
OUTPUT_STRIDES = (32, 16, 8, "auto")
LAST_STAGES = ("auto", "layer4", "layer3")


@dataclass
class EncoderConfig:
    """torchvision ResNet whose last conv grid becomes the image tokens."""

    arch: str = "resnet50"
    # None (random init), a torchvision weights name such as "IMAGENET1K_V2", or a path to a
    # torchvision state_dict (.pth loaded with weights_only=True, or .safetensors).
    weights: Optional[str] = None
    # Freeze nothing, everything, or every stage up to and including the named one.
    freeze: str = "none"
    # Pixels per grid cell: 32 (torchvision's ResNet), 16 or 8 (the last stages dilated instead of
    # strided, so pretrained weights stay valid), or "auto": the largest that still gives at least
    # a 4x4 grid at the model's image_size (a 2x2 grid cannot tell fine detail apart).
    output_stride: Union[int, str] = 32
    # "layer3" ends the trunk a stage early: a finer grid (stride 16) for much less compute. "auto":
    # layer3 where, with output_stride auto, layer4 would have to be dilated to give a 4x4 grid at
    # the model's image_size and layer3 gives one at its own stride (images up to 96 px); else layer4.
    last_stage: str = "auto"

    def __post_init__(self) -> None:
        if self.arch not in RESNETS:
            raise ValueError(f"encoder.arch must be one of {RESNETS}, got {self.arch!r}")
        if self.freeze not in FREEZE_POINTS:
            raise ValueError(f"encoder.freeze must be one of {FREEZE_POINTS}, got {self.freeze!r}")
        if isinstance(self.output_stride, str) and self.output_stride.isdigit():
            self.output_stride = int(self.output_stride)
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"encoder.output_stride must be one of {OUTPUT_STRIDES}, got {self.output_stride!r}")
        if self.last_stage not in LAST_STAGES:
            raise ValueError(f"encoder.last_stage must be one of {LAST_STAGES}, got {self.last_stage!r}")
        if self.last_stage == "layer3" and self.output_stride == 32:
            raise ValueError("encoder.last_stage layer3 gives stride 16 (or 8): set output_stride 16, 8 or auto")


@dataclass
class ProjectionConfig:
    """Maps grid features to the decoder width and adds learned 2-D positions."""

    kind: Literal["linear", "mlp"] = "linear"
    # Largest grid (rows and columns) the position table covers; None: the encoder's grid at the
    # model's image_size (the table follows the grid).
    max_grid: Optional[int] = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"projection.kind must be 'linear' or 'mlp', got {self.kind!r}")


@dataclass
class DecoderConfig:
    """A Hugging Face causal language model and how the image reaches it.

    With `pretrained` set (hub name or local directory of any `AutoModelForCausalLM` checkpoint),
    the family and the size fields come from the checkpoint; otherwise a small random-init model
    of `family` is built from the size fields.
    """

    # gpt2, bert, or any causal LM model type of transformers (llama, qwen2, gpt_neox, mistral, ...)
    family: str = "gpt2"
    pretrained: Optional[str] = None
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: Optional[int] = None  # default 4 * hidden_size
    max_positions: int = 64
    dropout: float = 0.1
    # "cross_attention": GPT-2's/BERT's own cross-attention layers, or for other LMs gated (tanh,
    # zero-init) cross-attention blocks inserted before every `cross_attention_every`-th layer.
    # "prefix": the image tokens come before the text (any LM).
    fusion: Literal["cross_attention", "prefix"] = "cross_attention"
    cross_attention_every: int = 1
    # What trains in the decoder (the projection and the fusion blocks always train): "full",
    # "lora" (peft adapters on the LM's projections) or "frozen" (the LM's own weights stay fixed).
    train: Literal["full", "lora", "frozen"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # Module names LoRA adapts; None: the family's attention and MLP projections (mmcap.model.lora).
    lora_targets: Optional[list[str]] = None
    gradient_checkpointing: bool = False  # recompute the LM's layers in the backward pass

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "bert") and not self.pretrained:
            if self.family not in causal_lm_types():
                raise ValueError(f"decoder.family must be gpt2, bert or a causal LM model type of transformers "
                                 f"(e.g. llama, qwen2, gpt_neox, mistral), got {self.family!r}")
        if self.fusion not in ("cross_attention", "prefix"):
            raise ValueError(f"decoder.fusion must be 'cross_attention' or 'prefix', got {self.fusion!r}")
        if self.train not in ("full", "lora", "frozen"):
            raise ValueError(f"decoder.train must be 'full', 'lora' or 'frozen', got {self.train!r}")
        if self.cross_attention_every < 1 or self.lora_rank < 1:
            raise ValueError("decoder.cross_attention_every and decoder.lora_rank must be >= 1")
        if self.lora_targets is not None:
            self.lora_targets = list(self.lora_targets)


@dataclass
class TokenizerConfig:
    """How to train a tokenizer from captions when the decoder is not pretrained."""

    kind: Literal["wordlevel", "bpe"] = "wordlevel"
    vocab_size: int = 8000
    min_frequency: int = 1
    lowercase: bool = True


@dataclass
class CaptionerConfig:
    """The whole model: what `config.json` of a saved model holds and what a recipe's
    `model.captioner` block (or a `configs/model/*.yaml` preset) sets. Inputs only: what a
    build resolves (the decoder's Hugging Face config) lives on the built model, never here."""

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
        """From plain data; a saved model's extra keys (`mmcap_version`, the resolved decoder
        config, also where 0.1 kept it, under `decoder.hf_config`) are ignored here."""
        d = {k: v for k, v in d.items() if k not in SAVED_ONLY_KEYS}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown captioner config keys: {sorted(unknown)}; known: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        kwargs = {}
        for name, typ in PARTS.items():
            value = d.get(name) or {}
            if isinstance(value, dict) and name == "decoder":
                value = {k: v for k, v in value.items() if k != "hf_config"}
            kwargs[name] = value if isinstance(value, typ) else _build(typ, value, name)
        for name in ("image_size", "max_caption_tokens"):
            if name in d:
                kwargs[name] = int(d[name])
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "CaptionerConfig":
        """Read a JSON or YAML file holding this schema: a `configs/model/*.yaml` preset or a
        saved model's `config.json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no captioner config file at {path}")
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of captioner config keys, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_recipe(cls, path: str | Path) -> "CaptionerConfig":
        """The model of a training recipe (`configs/*.yaml`): its `model.captioner` block, inline
        or a preset file path, with `data.image_size` / `data.max_caption_tokens` linked in as
        `mmcap fit` links them."""
        path = Path(path)
        recipe = read_config_file(path)
        model = (recipe.get("model") or {}) if isinstance(recipe, dict) else {}
        block = model.get("captioner", {})
        if isinstance(block, str):  # a preset file, relative to the working directory as on the CLI
            preset = Path(block)
            block = read_config_file(preset if preset.is_file() else path.parent / preset)
        block = dict(block or {})
        data = recipe.get("data") or {}
        for name in ("image_size", "max_caption_tokens"):
            if name in data:
                block[name] = data[name]
        try:
            return cls.from_dict(block)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: model.captioner: {e}") from None


PARTS = {"encoder": EncoderConfig, "projection": ProjectionConfig, "decoder": DecoderConfig,
         "tokenizer": TokenizerConfig}
# Written by `save_pretrained` beside the config proper: the version and the resolved decoder config.
SAVED_ONLY_KEYS = ("mmcap_version", "resolved")


@functools.cache
def causal_lm_types() -> frozenset[str]:
    """Model types transformers builds as causal LMs without remote code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def read_config_file(path: str | Path) -> Any:
    """Plain data from a JSON or YAML file (YAML's safe loader: no Python objects)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def _build(typ, value: dict, name: str):
    known = {f.name for f in dataclasses.fields(typ)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"unknown keys in {name} config: {sorted(unknown)}; known: {sorted(known)}")
    return typ(**value)


# torch.compile's keyword arguments a compile setting may pass (`model.training.compile`,
# `InferencePlan.resolve(compile_decoder=...)`)
COMPILE_OPTIONS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


class CompileSettingError(TypeError, ValueError):
    """A compile setting that is neither a bool nor a mapping (a TypeError, and a ValueError for
    callers that validate values)."""


def compile_kwargs(value: Union[bool, dict, None], what: str) -> Optional[dict[str, Any]]:
    """torch.compile's keyword arguments for a compile setting named `what`: None where it is off,
    {} (torch's defaults) for true, a mapping's own options, checked against `COMPILE_OPTIONS`."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(COMPILE_OPTIONS))
        if unknown:
            raise ValueError(f"{what}: unknown torch.compile option(s) {unknown}; known: {sorted(COMPILE_OPTIONS)}")
        return dict(value)
    raise CompileSettingError(f"{what} must be true, false or a mapping of torch.compile options, not {value!r}")
