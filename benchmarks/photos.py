"""Benchmark inputs: synthetic photo-like JPEGs (`photo_jpeg`, `make_photos`), so nothing is
downloaded, and `held_out_keys`, the held-out samples of `mmcap data demo` shards."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

def photo_jpeg(rng: np.random.Generator, size: tuple[int, int] = (640, 480), quality: int = 90) -> bytes:
    """A photo-like JPEG (width, height): a smooth colour field, a few shapes, sensor-like noise."""
    im = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(20, 160))
        box = [int(x - r), int(y - r * rng.uniform(0.5, 1.5)), int(x + r), int(y + r)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(im, dtype=np.float32) + rng.normal(0, 8, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    """`n` photo-like JPEG files in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:04d}.jpg"
        path.write_bytes(photo_jpeg(rng, size))
        paths.append(path)
    return paths


def held_out_keys(shards: str) -> set[str]:
    """Keys of the samples whose json marks a held-out combination, one the training split never
    shows (`mmcap data demo` writes the flag)."""
    from mmcap.data.shardlist import resolve_shards
    from mmcap.data.shards import read_members

    return {name[: -len(".json")] for path in resolve_shards(shards) for name, data in read_members(path)
            if name.endswith(".json") and json.loads(data).get("held_out")}
