"""What a caller may hand `Captioner`'s methods, and how it becomes one entry per image: images
(one or many paths, PIL images, bytes, or a tensor batch) and prompts (one text for every image,
or one per image)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from mmcap.images import ImageSource

Images = Union[ImageSource, Sequence[ImageSource], torch.Tensor]
Prompt = Union[None, str, Sequence[Optional[str]]]  # one text for every image, or one per image


def is_one_image(images: Images) -> bool:
    """Whether `images` is a single image (a path, PIL image or bytes, or a [3, H, W] tensor)."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        return images.dim() == 3
    return isinstance(images, (str, os.PathLike, bytes, Image.Image))


def image_sequence(images: Images):
    """Images as a sequence: one image becomes a batch of one (a [3, H, W] tensor one image, not
    three channels)."""
    if not is_one_image(images):
        return images
    return images[None] if isinstance(images, torch.Tensor) else [images]


def per_image(prompt: Prompt, n: int) -> list[Optional[str]]:
    """One prompt (or None) per image, from one for all or a list of `n`."""
    if prompt is None or isinstance(prompt, str):
        return [prompt] * n
    prompts = list(prompt)
    if len(prompts) != n or not all(p is None or isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a str or a list of {n} str (one per image), got {prompt!r}")
    return prompts
