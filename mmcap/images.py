"""Opening images safely and turning them into normalised tensors.

Every path into the model (training shards, `Captioner.caption`, the CLI) opens images here, so
odd-but-valid files (grayscale, RGBA, palette, CMYK, 16-bit, EXIF-rotated) are converted the
same way everywhere and unusable ones fail with an `ImageError` naming the file.
"""
from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import Callable, Union

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Captioning never needs more than ~40 Mpx; a header claiming more is a decompression bomb.
MAX_IMAGE_PIXELS = 40_000_000

ImageSource = Union[str, Path, bytes, Image.Image]


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable tag."""

    def __init__(self, name: str, reason: str, detail: str = ""):
        self.name, self.reason, self.detail = name, reason, detail
        super().__init__(f"{name}: {reason}" + (f" ({detail})" if detail else ""))


def open_image(source: ImageSource, name: str | None = None, *, min_size: int | None = None) -> Image.Image:
    """Decode `source` (path, bytes or PIL image) to an RGB PIL image, upright per EXIF.

    `min_size` lets JPEGs decode at a reduced scale (PIL's draft mode) as long as both sides
    stay at least that large: a 4000 px photo headed for a 224 px model decodes several times
    faster. Other formats ignore it.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        if len(source) == 0:
            raise ImageError(name, "empty_file")
        fp = io.BytesIO(source)
    else:
        name = name or str(source)
        path = Path(source)
        if not path.is_file():
            raise ImageError(name, "missing_file")
        if path.stat().st_size == 0:
            raise ImageError(name, "empty_file")
        fp = io.BytesIO(path.read_bytes())
    try:
        with warnings.catch_warnings():
            # PIL warns above its own (higher) limit before our check below rejects the image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=IMAGE_FORMATS)
        with im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageError(name, "too_large", f"{im.width}x{im.height} pixels")
            if min_size is not None and im.format == "JPEG":
                im.draft(None, (min_size, min_size))
            im.load()
            return to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(name, "too_large", str(e)) from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(name, "unreadable_image", f"{type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Upright RGB; alpha composited on white, 16-bit scaled to 8-bit."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not cost us an otherwise good image
        pass
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v * (1 / 256)).convert("L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("RGB") if im.mode != "RGB" else im


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side, centre crop, normalise: what the model sees at test time."""
    return T.Compose(
        [
            T.PILToTensor(),
            # Cropping the centred square first gives the same pixels as resize-then-crop, but a
            # 1 x 40M px image cannot blow up into a gigantic intermediate.
            center_square,
            T.Resize((image_size, image_size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@functools.lru_cache(maxsize=None)
def pixel_steps(image_size: int) -> tuple[Callable, Callable]:
    """`eval_transform` cut where the pixels turn into floats: (image -> uint8 pixels [3,S,S],
    pixels [..., 3, S, S] -> the model's input). Applied one after the other they compute exactly
    what `eval_transform` computes, so a batch can be made floats at once (one call over the stacked
    uint8 pixels, not two transforms per image) and a decode stage can ship uint8 pixels. Made once
    per size (the transforms keep no state)."""
    steps = eval_transform(image_size).transforms
    cut = next((i for i, step in enumerate(steps) if isinstance(step, T.ToDtype)), len(steps))

    def compose(part: list) -> Callable:
        return T.Compose(part) if part else (lambda x: x)

    return compose(steps[:cut]), compose(steps[cut:])


def center_square(pixels: torch.Tensor) -> torch.Tensor:
    """The largest centred square of a [..., H, W] tensor."""
    h, w = pixels.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return pixels[..., top : top + side, left : left + side]


def train_transform(image_size: int, hflip: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Mild random resized crop; flipping is off by default since captions say left and right."""
    steps = [T.PILToTensor(), T.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
