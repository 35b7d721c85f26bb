"""Data kinds for checking a training recipe on data it was not tuned on; not part of mmcap.

`objects` (alias `third`) is a third synthetic captioning set beside mmcap's two demo kinds
(`shapes`, `glyphs`: mmcap/data/demo.py). It is built to differ from both where real data
differs from them:

- natural variation within a class: every object is drawn from a random, deformed instance of
  its class (aspect ratio, rotation, shear, jittered outline, star points, ring thickness, ...),
  with a fill texture (solid, stripes, spots), shading and an optional outline;
- colours vary within a name (hue, saturation and brightness jitter);
- scale varies continuously inside the two size words, and positions continuously inside the
  nine regions the captions name;
- clutter: gradient, blotchy and noisy backgrounds, grey distractor strokes and blobs that no
  caption mentions, varying JPEG quality;
- references vary: 4 per image drawn from a pool of phrasings, with synonyms ("big"/"large",
  "little"/"small") and the size sometimes left out.

64 px images of one or two objects (6 classes x 6 colours); 8,000 training images by default.
Six colour/object pairs (one per colour and per object) never occur in train or val; in test,
`HELD_OUT_FRACTION` of the images contain one (the `held_out` flag in each json member).

Shards follow mmcap's demo convention exactly (`mmcap/data/shards.py`): `{split}-NNNNNN.tar`,
members `KEY.jpg`, `KEY.txt` (first caption), `KEY.json` (`{"captions": [...], ...}`), fixed
member times, plus `shards.json` (format `mmcap-shards/1`), so `mmcap fit` reads them with
`--data.train_shards 'DIR/train-*.tar' --data.val_shards ... --data.test_shards ...`.

    python benchmarks/data_kinds.py --kind objects --out data/objects     # writes, prints the oracle
    python benchmarks/data_kinds.py --kind glyphs --out data/glyphs --mmcap-src /work/mmcap_base

`shapes` and `glyphs` are written by mmcap's own `make_demo` (from the mmcap on sys.path, or
`--mmcap-src`). `oracle_cider` scores each test image's first reference against its other three
with mmcap's CIDEr-D (equal to pycocoevalcap's).
"""
from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# ------------------------------------------------------------------------------------------ vocabulary
COLOURS = {  # name -> hue (0..1); saturation and value vary per instance
    "red": 0.995,
    "orange": 0.075,
    "yellow": 0.150,
    "green": 0.330,
    "blue": 0.620,
    "purple": 0.790,
}
OBJECTS = ("ball", "box", "triangle", "star", "ring", "cross")
# One pair per colour and per object: a Latin transversal, so every colour and every object is seen.
HELD_OUT = (("red", "star"), ("orange", "ring"), ("yellow", "cross"), ("green", "ball"), ("blue", "box"),
            ("purple", "triangle"))
SIZES = {"small": (0.085, 0.115), "large": (0.150, 0.195)}  # radius range as a fraction of the side
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# Nine regions: (column, row) centre fractions; a single object sits within +-REGION_JITTER of one.
COLUMNS = {"left": 0.24, "centre": 0.5, "right": 0.76}
ROWS = {"top": 0.24, "middle": 0.5, "bottom": 0.76}
REGION_JITTER = 0.065
PLACE_PHRASES = {
    ("left", "top"): ("in the top left", "in the top left corner"),
    ("centre", "top"): ("at the top", "at the top"),
    ("right", "top"): ("in the top right", "in the top right corner"),
    ("left", "middle"): ("on the left", "on the left side"),
    ("centre", "middle"): ("in the middle", "in the centre"),
    ("right", "middle"): ("on the right", "on the right side"),
    ("left", "bottom"): ("in the bottom left", "in the bottom left corner"),
    ("centre", "bottom"): ("at the bottom", "at the bottom"),
    ("right", "bottom"): ("in the bottom right", "in the bottom right corner"),
}
HELD_OUT_FRACTION = 0.5  # of test images; val and train never hold a held-out pair
DEFAULT_IMAGE_SIZE = 64
DEFAULT_TRAIN, DEFAULT_VAL, DEFAULT_TEST = 8000, 300, 500
FORMAT_VERSION = 1
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges
KINDS = ("objects", "shapes", "glyphs")
ALIASES = {"third": "objects"}
NATIVE_IMAGE_SIZE = {"objects": 64, "shapes": 128, "glyphs": 64}


@dataclass(frozen=True)
class Thing:
    colour: str
    obj: str
    size: str
    radius: float  # fraction of the side
    x: float  # centre, fractions of the side
    y: float
    column: str  # the region it sits in (single objects); pairs: "pair"
    row: str
    hue: float
    sat: float
    val: float
    angle: float  # radians
    aspect: float
    fill: str  # solid / stripes / spots
    outline: bool
    variant: int  # class-specific shape parameter seed


@dataclass(frozen=True)
class ObjScene:
    things: tuple[Thing, ...]
    layout: str  # single / horizontal / vertical (pairs: first thing left or top)
    words: tuple[int, ...]  # per-reference choices, drawn with the scene (captions are deterministic)

    @property
    def held_out(self) -> bool:
        return any((t.colour, t.obj) in HELD_OUT for t in self.things)

    def captions(self) -> list[str]:
        rng = random.Random(self.words[0])

        def noun(t: Thing, with_size: bool = True) -> str:
            size = rng.choice(SIZE_WORDS[t.size]) if rng.random() < 0.4 else SIZE_WORDS[t.size][0]
            return f"{size} {t.colour} {t.obj}" if with_size else f"{t.colour} {t.obj}"

        if self.layout == "single":
            t = self.things[0]
            phrases = PLACE_PHRASES[(t.column, t.row)]
            templates = [
                "a {n} {w}", "there is a {n} {w}", "{w} there is a {n}", "a picture of a {n} {w}",
                "a {n} sits {w}", "the image shows a {n} {w}", "a {m} {w}", "one {n} {w}",
            ]
            chosen = rng.sample(templates, 4)
            return [_articles(tpl.format(n=noun(t), m=noun(t, False), w=rng.choice(phrases))) for tpl in chosen]
        a, b = self.things
        if self.layout == "horizontal":
            templates = ["a {A} to the left of a {B}", "a {B} to the right of a {A}", "there is a {A} left of a {B}",
                         "a {A} and a {B} side by side", "a {A} next to a {B}", "a {B} on the right of a {A}"]
        else:
            templates = ["a {A} above a {B}", "a {B} below a {A}", "a {A} over a {B}", "a {B} under a {A}",
                         "a {A} and a {B} one above the other", "there is a {A} above a {B}"]
        chosen = rng.sample(templates, 4)
        out = []
        for tpl in chosen:
            sized = rng.random() < 0.75
            out.append(_articles(tpl.format(A=noun(a, sized), B=noun(b, sized))))
        return out

    def meta(self) -> dict:
        return {"held_out": self.held_out, "layout": self.layout,
                "objects": [{k: v for k, v in asdict(t).items() if k in ("colour", "obj", "size", "x", "y")}
                            for t in self.things]}


def _articles(caption: str) -> str:
    """"a orange ..." -> "an orange ..." (the only colour that starts with a vowel)."""
    return re.sub(r"\ba orange\b", "an orange", caption)


def vocabulary() -> list[str]:
    words = set(COLOURS) | set(OBJECTS) | {w for pair in SIZE_WORDS.values() for w in pair}
    for phrases in PLACE_PHRASES.values():
        for p in phrases:
            words |= set(p.split())
    words |= set("a an there is picture of sits the image shows one to left right next and side by on above below "
                 "over under other".split())
    return sorted(words)


# ------------------------------------------------------------------------------------------ sampling
def _thing(rng: random.Random, colour: str, obj: str, x: float, y: float, column: str, row: str,
           size: Optional[str] = None) -> Thing:
    size = size or rng.choice(list(SIZES))
    lo, hi = SIZES[size]
    return Thing(
        colour=colour, obj=obj, size=size, radius=rng.uniform(lo, hi), x=x, y=y, column=column, row=row,
        hue=(COLOURS[colour] + rng.uniform(-0.018, 0.018)) % 1.0, sat=rng.uniform(0.65, 0.95),
        val=rng.uniform(0.62, 0.95), angle=rng.uniform(-math.pi, math.pi), aspect=math.exp(rng.uniform(-0.3, 0.3)),
        fill=rng.choices(("solid", "stripes", "spots"), (0.5, 0.25, 0.25))[0], outline=rng.random() < 0.3,
        variant=rng.getrandbits(32),
    )


def sample_scene(rng: random.Random, held_out: bool = False) -> ObjScene:
    seen = [(c, o) for c in COLOURS for o in OBJECTS if (c, o) not in HELD_OUT]
    n = 1 if rng.random() < 0.5 else 2
    kinds = rng.sample(seen, n)
    if held_out:
        kinds[rng.randrange(n)] = rng.choice(HELD_OUT)
    if n == 1:
        column, row = rng.choice(list(COLUMNS)), rng.choice(list(ROWS))
        x = COLUMNS[column] + rng.uniform(-REGION_JITTER, REGION_JITTER)
        y = ROWS[row] + rng.uniform(-REGION_JITTER, REGION_JITTER)
        things = (_thing(rng, *kinds[0], x, y, column, row),)
        layout = "single"
    else:
        layout = rng.choice(("horizontal", "vertical"))
        along = (rng.uniform(0.2, 0.34), rng.uniform(0.66, 0.8))  # first: left (or top)
        across = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
        things = tuple(
            _thing(rng, colour, obj, *((along[i], across[i]) if layout == "horizontal" else (across[i], along[i])),
                   "pair", "pair")
            for i, (colour, obj) in enumerate(kinds))
    return ObjScene(things, layout, (rng.getrandbits(32),))


# ------------------------------------------------------------------------------------------ drawing
def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def _outline(t: Thing, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of one deformed instance of the object's class (rings: the outer edge)."""
    rng = random.Random(t.variant)
    if t.obj in ("ball", "ring"):
        n = 40
        base = [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)]
        wobble = [1 + 0.05 * math.sin(2 * math.pi * i / n * 3 + rng.uniform(0, 6)) for i in range(n)]
        pts = [(px * w, py * w) for (px, py), w in zip(base, wobble)]
    elif t.obj == "box":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(px * 0.85 + rng.uniform(-0.08, 0.08), py * 0.85 + rng.uniform(-0.08, 0.08)) for px, py in pts]
    elif t.obj == "triangle":
        angles = [-90 + rng.uniform(-12, 12), 30 + rng.uniform(-12, 12), 150 + rng.uniform(-12, 12)]
        pts = [(math.cos(math.radians(a)) * rng.uniform(0.95, 1.1), math.sin(math.radians(a)) * rng.uniform(0.95, 1.1))
               for a in angles]
    elif t.obj == "star":
        points = rng.choice((5, 5, 6))
        inner = rng.uniform(0.38, 0.52)
        pts = []
        for i in range(2 * points):
            rad = (1.1 if i % 2 == 0 else inner) * rng.uniform(0.92, 1.08)
            a = math.pi * i / points - math.pi / 2
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif t.obj == "cross":
        w = rng.uniform(0.28, 0.42)
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
        pts = [(px + rng.uniform(-0.05, 0.05), py + rng.uniform(-0.05, 0.05)) for px, py in pts]
    else:
        raise ValueError(f"unknown object {t.obj!r}")
    shear = rng.uniform(-0.15, 0.15)
    c, s = math.cos(t.angle), math.sin(t.angle)
    out = []
    for px, py in pts:
        px, py = (px + shear * py) * t.aspect ** 0.5, py / t.aspect ** 0.5
        out.append((cx + r * (px * c - py * s), cy + r * (px * s + py * c)))
    return out


def _background(rng: np.random.Generator, big: int, small: int) -> Image.Image:
    tone = rng.uniform(150, 235)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:big, 0:big] / big
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(-30, 30) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    blotches = rng.standard_normal((6, 6)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(blotches, mode="F").resize((big, big), Image.Resampling.BICUBIC))
    base = tone + tint[None, None, :] + gradient[..., None] + rng.uniform(3, 10) * blotches[..., None]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    """Grey distractor strokes and blobs (never in a caption): low saturation, any darkness."""
    for _ in range(int(rng.integers(0, 5))):
        grey = int(rng.uniform(60, 200))
        col = tuple(int(np.clip(grey + rng.uniform(-12, 12), 0, 255)) for _ in range(3))
        if rng.random() < 0.65:
            n = int(rng.integers(2, 5))
            start = rng.uniform(0, big, size=2)
            pts = [tuple(start)]
            for _ in range(n - 1):
                start = start + rng.uniform(-0.35, 0.35, size=2) * big
                pts.append(tuple(start))
            draw.line(pts, fill=col, width=int(rng.integers(1, 3)) * SUPERSAMPLE // 2 + 1, joint="curve")
        else:
            cx, cy = rng.uniform(0, big, size=2)
            r = rng.uniform(0.02, 0.05) * big
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=col)


def _draw_thing(im: Image.Image, t: Thing, big: int, rng: np.random.Generator) -> None:
    cx, cy, r = t.x * big, t.y * big, t.radius * big
    poly = _outline(t, cx, cy, r)
    mask = Image.new("L", im.size, 0)
    md = ImageDraw.Draw(mask)
    md.polygon(poly, fill=255)
    if t.obj == "ring":
        hole = rng.uniform(0.45, 0.65)
        inner = [(cx + hole * (px - cx), cy + hole * (py - cy)) for px, py in poly]
        md.polygon(inner, fill=0)
    colour = np.array(_rgb(t.hue, t.sat, t.val), dtype=np.float32)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    # shading: brighter towards a random light direction
    a = rng.uniform(0, 2 * np.pi)
    shade = 1 + 0.18 * (((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / max(r, 1)).clip(-1, 1)
    fill = colour[None, None, :] * shade[..., None]
    if t.fill == "stripes":
        period = rng.uniform(0.35, 0.6) * r
        d = xx * np.cos(a + 1.3) + yy * np.sin(a + 1.3)
        fill *= np.where(np.sin(2 * np.pi * d / period) > 0, 1.0, rng.uniform(0.7, 0.85))[..., None]
    elif t.fill == "spots":
        spots = rng.standard_normal((8, 8)).astype(np.float32)
        spots = np.asarray(Image.fromarray(spots, mode="F").resize((big, big), Image.Resampling.BICUBIC))
        fill *= (1 + 0.12 * spots)[..., None]
    fill_im = Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8))
    im.paste(fill_im, (0, 0), mask)
    if t.outline:
        dark = tuple(int(c * 0.45) for c in colour)
        ImageDraw.Draw(im).line(poly + [poly[0]], fill=dark, width=SUPERSAMPLE)


def draw_scene(scene: ObjScene, image_size: int = DEFAULT_IMAGE_SIZE, noise_seed: int = 0) -> tuple[Image.Image, int]:
    """The image and the JPEG quality to store it at."""
    rng = np.random.default_rng(noise_seed)
    big = SUPERSAMPLE * image_size
    im = _background(rng, big, image_size)
    _clutter(ImageDraw.Draw(im), rng, big)
    for t in scene.things:
        _draw_thing(im, t, big, rng)
    if rng.random() < 0.3:  # a distractor in front of the objects now and then
        _clutter(ImageDraw.Draw(im), rng, big)
    im = im.resize((image_size, image_size), Image.Resampling.BOX)
    if rng.random() < 0.25:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    pixels = np.asarray(im, dtype=np.float32)
    pixels += rng.uniform(2, 9) * rng.standard_normal(pixels.shape).astype(np.float32)
    im = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return im, int(rng.integers(70, 96))


# ------------------------------------------------------------------------------------------ shards
def _int_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def scenes(split: str, n: int, seed: int = 0, held_out_fraction: float = HELD_OUT_FRACTION) -> list[ObjScene]:
    rng = random.Random(_int_seed(seed, split, "objects"))
    held = split == "test"
    return [sample_scene(rng, held_out=held and rng.random() < held_out_fraction) for _ in range(n)]


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
    tar.addfile(info, io.BytesIO(data))


def write_split(out: Path, split: str, samples: Iterator[tuple[str, bytes, list[str], dict]], n: int,
                shards: int) -> dict:
    """`{split}-NNNNNN.tar` with KEY.jpg / KEY.txt / KEY.json members, as mmcap's shard writer does."""
    for old in out.glob(f"{split}-*.tar"):
        old.unlink()
    per_shard = max(1, -(-n // shards))
    index, tar, name, count = {}, None, None, 0
    for i, (key, jpg, captions, meta) in enumerate(samples):
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
                index[name] = count
            name, count = f"{split}-{i // per_shard:06d}.tar", 0
            tar = tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT)
        _add(tar, f"{key}.jpg", jpg)
        _add(tar, f"{key}.txt", captions[0].encode())
        _add(tar, f"{key}.json", json.dumps({"captions": captions, **meta}, sort_keys=True).encode())
        count += 1
    if tar is not None:
        tar.close()
        index[name] = count
    return index


def make_objects(out_dir: str | Path, seed: int = 0, n_train: int = DEFAULT_TRAIN, n_val: int = DEFAULT_VAL,
                 n_test: int = DEFAULT_TEST, image_size: int = DEFAULT_IMAGE_SIZE, train_shards: int = 8,
                 eval_shards: int = 2, held_out_fraction: float = HELD_OUT_FRACTION, force: bool = False) -> dict:
    """Write the `objects` kind to `out_dir` (skipped when `kind.json` records the same settings)."""
    out = Path(out_dir)
    settings = {"kind": "objects", "format": FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val,
                "n_test": n_test, "image_size": image_size, "held_out_fraction": held_out_fraction}
    marker = out / "kind.json"
    if not force and marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        return json.loads(marker.read_text())
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    index = {}
    for split, n, shards in (("train", n_train, train_shards), ("val", n_val, eval_shards),
                             ("test", n_test, eval_shards)):
        def samples(split=split, n=n):
            for i, scene in enumerate(scenes(split, n, seed, held_out_fraction)):
                image, quality = draw_scene(scene, image_size, noise_seed=_int_seed(seed, split, i, "objects"))
                yield f"{split}_{i:05d}", _jpeg(image, quality), scene.captions(), scene.meta()
        index.update(write_split(out, split, samples(), n, shards))
    shard_index = {"format": "mmcap-shards/1",
                   "shards": {name: {"samples": c, "bytes": (out / name).stat().st_size} for name, c in sorted(index.items())}}
    (out / "shards.json").write_text(json.dumps(shard_index, indent=1))
    held = ", ".join(f"{c} {o}" for c, o in HELD_OUT)
    (out / "README.txt").write_text("\n".join([
        "objects: a third synthetic captioning kind (benchmarks/data_kinds.py), not one of mmcap's demos",
        f"{image_size}x{image_size} JPEGs of one or two deformed, textured, shaded objects on cluttered backgrounds,",
        "4 reference captions per image from a pool of phrasings.",
        f"colours: {', '.join(COLOURS)}; objects: {', '.join(OBJECTS)}; sizes: small/little, large/big",
        f"held out of train and val (in {held_out_fraction:.0%} of test images): {held}",
        f"vocabulary ({len(vocabulary())} words): {' '.join(vocabulary())}",
        f"settings: {json.dumps(settings)}", ""]))
    done = {"settings": settings, "splits": {s: {"samples": sum(c for k, c in index.items() if k.startswith(s))}
                                             for s in ("train", "val", "test")}}
    marker.write_text(json.dumps(done, indent=1))
    return {**done, "seconds": round(time.perf_counter() - started, 1)}


def canonical(kind: str) -> str:
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS} (and {sorted(ALIASES)})")
    return kind


def make_kind(kind: str, out_dir: str | Path, seed: int = 0, force: bool = False) -> dict:
    """Write data of `kind` to `out_dir`: objects here, shapes/glyphs with mmcap's own `make_demo`."""
    kind = canonical(kind)
    if kind == "objects":
        return make_objects(out_dir, seed=seed, force=force)
    from mmcap.data.demo import make_demo  # the mmcap on sys.path (bench_recipe puts --mmcap-src first)

    return make_demo(out_dir, seed=seed, kind=kind, force=force)


# ------------------------------------------------------------------------------------------ reading
def read_split(pattern: str) -> list[tuple[str, bytes, list[str], dict]]:
    """(key, image bytes, captions, json meta) of every sample of the shards matching `pattern`, in
    shard order; no mmcap needed."""
    import glob

    out = []
    for path in sorted(glob.glob(pattern)):
        members: dict[str, dict] = {}
        order = []
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = tar.extractfile(m).read()
        for key in order:
            mem = members[key]
            image = next((mem[e] for e in ("jpg", "jpeg", "png", "webp") if e in mem), None)
            meta = json.loads(mem["json"]) if "json" in mem else {}
            captions = meta.get("captions") or [mem.get("txt", b"").decode()]
            if image is not None:
                out.append((key, image, captions, meta))
    return out


def oracle_cider(references: dict[str, list[str]]) -> float:
    """CIDEr-D (mmcap.metrics, equal to pycocoevalcap's) of each image's first reference against its
    other references: what a perfect describer scores."""
    from mmcap.metrics import caption_metrics

    usable = {k: r for k, r in references.items() if len(r) >= 2}
    return caption_metrics({k: r[1:] for k, r in usable.items()}, {k: r[0] for k, r in usable.items()},
                           meteor=False)["CIDEr"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="objects", help=f"{'|'.join(KINDS)} (third = objects)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.add_argument("--mmcap-src", default=None, help="the mmcap source tree to import (default: the installed one)")
    p.add_argument("--samples", default=None, help="also write the first N test images as PNG grid here")
    args = p.parse_args(argv)
    if args.mmcap_src:
        sys.path.insert(0, os.path.abspath(args.mmcap_src))
    info = make_kind(args.kind, args.out, seed=args.seed, force=args.force)
    test = read_split(os.path.join(args.out, "test-*.tar"))
    refs = {k: c for k, _, c, _ in test}
    info["oracle_CIDEr"] = round(oracle_cider(refs), 4)
    info["held_out_test_images"] = sum(bool(m.get("held_out")) for _, _, _, m in test)
    if args.samples:
        tiles = [Image.open(io.BytesIO(img)).convert("RGB").resize((128, 128), Image.Resampling.NEAREST)
                 for _, img, _, _ in test[:16]]
        grid = Image.new("RGB", (4 * 128, 4 * 128))
        for i, tile in enumerate(tiles):
            grid.paste(tile, ((i % 4) * 128, (i // 4) * 128))
        grid.save(args.samples)
        for k, _, c, _ in test[:16]:
            print(k, c)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
