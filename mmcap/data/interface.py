"""`TrainingData`: what the LightningModule needs from its datamodule, spelled out.

`CaptionModule` talks to its data only through these members (checked with `isinstance`), so a
custom datamodule knows what to provide and neither side reaches into the other's attributes.
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol, runtime_checkable


@runtime_checkable
class TrainingData(Protocol):
    # A `mmcap features` directory when training from precomputed encoder grids, else None.
    features_dir: Optional[str]

    def train_captions(self, limit: Optional[int] = None) -> Iterator[str]:
        """Every training caption (and prompt): a tokenizer trained from config is trained on them."""

    def train_references(self, limit: Optional[int] = None) -> Iterator[list[str]]:
        """Each training image's references: CIDEr-D document frequencies for SCST."""

    def set_tokenizer(self, tokenizer) -> None:
        """From now on, batches carry `input_ids`/`attention_mask` made by `tokenizer(captions, max_tokens)`
        (and `labels` from `tokenizer(captions, max_tokens, prompts=...)` when samples have prompts)."""
