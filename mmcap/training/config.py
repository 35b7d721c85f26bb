"""The training-only config blocks of a recipe's `model:` section, and how a block is read from
YAML, JSON or checkpoint hyperparameters."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from mmcap.config import CaptionerConfig
from mmcap.generation.config import GenerationConfig
from mmcap.training.scst import SCSTConfig


@dataclass
class TrainingConfig:
    """A recipe's `model.training` block: options that exist only while training."""

    label_smoothing: float = 0.0
    # Share of the decoder's input words (teacher forcing; never BOS) shown as UNK, so that each
    # word is predicted more from the image than from the words before it.
    token_dropout: float = 0.0
    max_bad_steps: int = 20  # consecutive non-finite steps (skipped) tolerated before raising
    tokenizer_max_captions: Optional[int] = None  # training captions read to train a tokenizer
    val_meteor: bool = False  # METEOR (Java, slow to start) at validation too; test always has it
    grid_images: int = 8  # images in the caption grid logged at each validation (0: none)
    channels_last: bool = False  # encoder in channels-last memory format (faster on CPUs, tensor cores)
    # torch.compile the teacher-forced loss (forward and backward): true, or torch.compile's options
    # such as {mode: max-autotune}. The first steps pay the compile (about a minute for ResNet-50 + GPT-2).
    compile: Union[bool, dict[str, Any]] = False
    # Start from this save_pretrained directory (its config replaces model.captioner), e.g. for SCST.
    init_from: Optional[str] = None
    # Self-critical sequence training (CIDEr-D rewards) instead of cross-entropy.
    scst: Optional[SCSTConfig] = None

    def __post_init__(self) -> None:
        if isinstance(self.scst, dict):
            self.scst = SCSTConfig(**self.scst)


def coerce(typ, value):
    """A config dataclass from an instance, a dict (YAML/JSON, checkpoint hparams) or None."""
    if value is None or isinstance(value, typ):
        return value if value is not None else typ()
    if typ is CaptionerConfig:
        return CaptionerConfig.from_dict(value if isinstance(value, dict) else dataclasses.asdict(value))
    if typ is GenerationConfig:
        return GenerationConfig.coerce(value)
    return typ(**(value if isinstance(value, dict) else dataclasses.asdict(value)))
