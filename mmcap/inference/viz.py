"""Figures for people: images with their generated and reference captions."""
from __future__ import annotations

import math
import textwrap
from typing import Optional, Sequence

import torch

from mmcap.images import IMAGENET_MEAN, IMAGENET_STD


def to_display(pixels: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: [3,H,W] or [B,3,H,W] -> HWC / BHWC floats in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = pixels.detach().float().cpu() * std + mean
    return x.clamp(0, 1).movedim(-3, -1)


def caption_grid(images: torch.Tensor | Sequence[torch.Tensor], captions: Sequence[str],
                 references: Optional[Sequence[Sequence[str]]] = None, columns: int = 4, width: int = 32):
    """A matplotlib Figure: each normalised image above its generated caption and references.

    Matching references (case and spaces ignored) are marked with a check, so a grid shows at a
    glance which captions came out exactly right.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    n = len(captions)
    if n == 0:
        raise ValueError("caption_grid needs at least one image")
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    n_refs = max((len(r) for r in references), default=0) if references is not None else 0
    text_lines = 2 + 2 * min(n_refs, 3)
    fig = Figure(figsize=(3.2 * columns, rows * (3.0 + 0.22 * text_lines)))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(to_display(images[i]).numpy())
        refs = list(references[i]) if references is not None else []
        exact = _norm(captions[i]) in {_norm(r) for r in refs}
        lines = textwrap.wrap(f"{'✓ ' if exact else ''}{captions[i]}", width) or [""]
        for r in refs[:3]:
            lines += textwrap.wrap(f"ref: {r}", width)
        ax.set_title("\n".join(lines), fontsize=8, loc="left", color="darkgreen" if exact else "black")
    fig.tight_layout()
    return fig


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def plot_attention(image, tokens, attention: Optional[torch.Tensor] = None, columns: int = 5, alpha: float = 0.6):
    """The *Show, Attend and Tell* figure: a panel per token with its attention over the image.

    `image` is a PIL image (or an HWC array in [0, 1]). Pass one image's result of
    `Captioner.caption(..., return_attention=True)` (or a `caption_details` item) as `tokens`,
    or the words and their `(tokens, H, W)` attention separately. Each map is upsampled to the
    image size (bilinear) and laid over it.
    """
    import numpy as np
    from matplotlib.figure import Figure

    if attention is None:
        tokens, attention = tokens.words, tokens.attention
        if attention is None or isinstance(attention, (list, tuple)):
            raise ValueError("plot_attention takes the attention of one image: caption one image with "
                             "return_attention=True, or pass result.words[i], result.attention[i]")
    if len(tokens) != len(attention):
        raise ValueError(f"{len(tokens)} tokens but {len(attention)} attention maps")
    picture = np.asarray(image, dtype=np.float32)
    picture = picture / 255.0 if picture.max() > 1.0 else picture
    h, w = picture.shape[:2]
    maps = torch.nn.functional.interpolate(attention[:, None].float(), size=(h, w), mode="bilinear",
                                           align_corners=False)[:, 0]
    columns = max(1, min(columns, len(tokens)))
    rows = math.ceil(len(tokens) / columns)
    fig = Figure(figsize=(2.4 * columns, 2.6 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, token, heat in zip(axes.flat, tokens, maps):
        ax.imshow(picture)
        ax.imshow(heat.numpy(), cmap="jet", alpha=alpha, extent=(0, w, h, 0))
        ax.set_title(token or "<end>", fontsize=11)
    fig.tight_layout()
    return fig
