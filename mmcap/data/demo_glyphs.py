"""The second demo kind, `glyphs`: small stroke-drawn marks on textured 64 px backgrounds.

Made to check defaults tuned on the shapes demo on data they were not tuned on. It differs in
what matters to a captioner: 64 px images (a stride-32 ResNet sees a 2x2 grid), objects whose
identity lies in thin strokes (a cross and a plus differ only in angle), textured backgrounds,
and its own vocabulary and phrasing. One or two marks per image; 4 references per image:

    one mark:  "a red zigzag in the top left corner", "the top left corner holds a red zigzag",
               "red zigzag mark, top left corner", "a red zigzag drawn in the top left corner"
    two marks: "a red zigzag beside a blue ring", "a blue ring beside a red zigzag",
               "a red zigzag and a blue ring side by side", "red zigzag next to blue ring"

Colour/glyph pairs in `HELD_OUT` never occur in train or val; about a quarter of test images
hold one. Everything is derived from the seed: the same seed gives the same bytes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "green": (20, 140, 50),
    "purple": (140, 40, 180),
    "black": (25, 25, 25),
}
GLYPHS = ("plus", "cross", "ring", "zigzag", "arrow", "hook", "bars", "wave")
HELD_OUT = (("red", "ring"), ("blue", "arrow"), ("green", "cross"), ("purple", "wave"), ("black", "hook"))
# Corners and centre of the image for a single mark: (x, y) as fractions of the side.
PLACES = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
          "bottom right": (0.72, 0.72), "centre": (0.5, 0.5)}
PLACE_PHRASES = {"top left": "in the top left corner", "top right": "in the top right corner",
                 "bottom left": "in the bottom left corner", "bottom right": "in the bottom right corner",
                 "centre": "in the centre"}
GLYPH_RADIUS = 0.13  # half the mark's extent, as a fraction of the side (about 8 px at 64 px)
DEFAULT_IMAGE_SIZE = 64
DEFAULT_TRAIN = 8000
DESCRIPTION = "small stroke-drawn glyphs (one or two) on textured backgrounds"


@dataclass(frozen=True)
class Mark:
    colour: str
    glyph: str
    place: str  # a PLACES key, or "pair-left"/"pair-right"
    x: float
    y: float
    angle: float  # small rotation, radians

    def name(self) -> str:
        return f"{self.colour} {self.glyph}"


@dataclass(frozen=True)
class GlyphScene:
    marks: tuple[Mark, ...]
    texture: str  # "grain", "stripes" or "checks"
    tone: int  # background grey level

    @property
    def held_out(self) -> bool:
        return any((m.colour, m.glyph) in HELD_OUT for m in self.marks)

    def captions(self) -> list[str]:
        if len(self.marks) == 1:
            m = self.marks[0]
            where = PLACE_PHRASES[m.place]
            return [f"a {m.name()} {where}", f"the {m.place} corner holds a {m.name()}"
                    if m.place != "centre" else f"the centre holds a {m.name()}",
                    f"{m.name()} mark, {m.place}" + (" corner" if m.place != "centre" else ""),
                    f"a {m.name()} drawn {where}"]
        a, b = self.marks
        return [f"a {a.name()} beside a {b.name()}", f"a {b.name()} beside a {a.name()}",
                f"a {a.name()} and a {b.name()} side by side", f"{a.name()} next to {b.name()}"]

    def meta(self) -> dict:
        return {"held_out": self.held_out, "texture": self.texture,
                "marks": [{"colour": m.colour, "glyph": m.glyph, "place": m.place} for m in self.marks]}


def sample_scene(rng: random.Random, held_out: bool = False) -> GlyphScene:
    seen = [(c, g) for c in COLOURS for g in GLYPHS if (c, g) not in HELD_OUT]
    if rng.random() < 0.6:
        kinds = [rng.choice(seen)]
        places = [rng.choice(list(PLACES))]
    else:
        kinds = rng.sample(seen, 2)
        places = ["pair-left", "pair-right"]
    if held_out:
        kinds[rng.randrange(len(kinds))] = rng.choice(HELD_OUT)
    marks = []
    row = rng.uniform(0.35, 0.65)
    for (colour, glyph), place in zip(kinds, places):
        if place.startswith("pair"):
            x, y = (0.28 if place == "pair-left" else 0.72), row
        else:
            x, y = PLACES[place]
        marks.append(Mark(colour, glyph, place, x + rng.uniform(-0.03, 0.03), y + rng.uniform(-0.03, 0.03),
                          rng.uniform(-0.2, 0.2)))
    return GlyphScene(tuple(marks), texture=rng.choice(("grain", "stripes", "checks")), tone=rng.randint(175, 235))


def draw_scene(scene: GlyphScene, image_size: int = DEFAULT_IMAGE_SIZE, noise_seed: int = 0) -> Image.Image:
    """Background texture, then each glyph as thin strokes drawn at 4x and scaled down."""
    scale = 4
    big = scale * image_size
    rng = np.random.default_rng(noise_seed)
    im = Image.fromarray(_texture(scene, big, rng))
    draw = ImageDraw.Draw(im)
    width = max(1, round(0.035 * big))  # about 2 px strokes at 64 px
    for m in scene.marks:
        for stroke in _strokes(m.glyph):
            points = [_place(p, m, big) for p in stroke]
            draw.line(points, fill=COLOURS[m.colour], width=width, joint="curve")
    return im.resize((image_size, image_size), Image.Resampling.BOX)


def _texture(scene: GlyphScene, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.full((size, size, 3), scene.tone, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    if scene.texture == "stripes":
        period = size / rng.uniform(6, 12)
        base += 12 * np.sin(2 * np.pi * (xx + yy) / period)[..., None]
    elif scene.texture == "checks":
        cell = size // int(rng.integers(5, 9))
        base += 10 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1)[..., None]
    base += 8 * rng.standard_normal((size, size, 1))
    return np.clip(base, 0, 255).astype(np.uint8)


def _strokes(glyph: str) -> list[list[tuple[float, float]]]:
    """Polylines in a unit box [-1, 1]^2 (y down)."""
    if glyph == "plus":
        return [[(0, -1), (0, 1)], [(-1, 0), (1, 0)]]
    if glyph == "cross":
        return [[(-0.8, -0.8), (0.8, 0.8)], [(-0.8, 0.8), (0.8, -0.8)]]
    if glyph == "ring":
        t = np.linspace(0, 2 * np.pi, 25)
        return [[(0.85 * np.cos(a), 0.85 * np.sin(a)) for a in t]]
    if glyph == "zigzag":
        return [[(-1, -0.6), (-0.5, 0.6), (0, -0.6), (0.5, 0.6), (1, -0.6)]]
    if glyph == "arrow":
        return [[(-1, 0), (1, 0)], [(0.4, -0.6), (1, 0), (0.4, 0.6)]]
    if glyph == "hook":
        t = np.linspace(0, np.pi, 12)
        return [[(0.5, -1), (0.5, 0.3)] + [(0.5 * np.cos(a) + 0.0, 0.3 + 0.5 * np.sin(a)) for a in t]]
    if glyph == "bars":
        return [[(-0.6, -1), (-0.6, 1)], [(0, -1), (0, 1)], [(0.6, -1), (0.6, 1)]]
    if glyph == "wave":
        t = np.linspace(-1, 1, 17)
        return [[(x, 0.5 * np.sin(np.pi * 1.5 * x)) for x in t]]
    raise ValueError(f"unknown glyph {glyph!r}")


def _place(p: tuple[float, float], m: Mark, big: int) -> tuple[float, float]:
    c, s = np.cos(m.angle), np.sin(m.angle)
    x, y = p[0] * c - p[1] * s, p[0] * s + p[1] * c
    r = GLYPH_RADIUS * big
    return (m.x * big + r * x, m.y * big + r * y)


def vocabulary() -> list[str]:
    words = set(COLOURS) | set(GLYPHS)
    for text in ("a the and beside next to side by drawn holds mark corner centre in",
                 " ".join(PLACE_PHRASES.values()), " ".join(PLACES)):
        words |= set(text.split())
    return sorted(words)


def readme_lines(image_size: int) -> list[str]:
    held = ", ".join(f"{c} {g}" for c, g in HELD_OUT)
    return [
        f"{image_size}x{image_size} JPEG scenes of one or two small stroke-drawn glyphs on a textured",
        "(grain, stripes or checks) background, each with 4 reference captions generated from the scene.",
        "",
        f"colours: {', '.join(COLOURS)}",
        f"glyphs:  {', '.join(GLYPHS)}",
        f"places:  {', '.join(PLACES)}; pairs: 'beside' / 'next to' / 'side by side'",
        f"vocabulary ({len(vocabulary())} words): {' '.join(vocabulary())}",
        "",
        f"held out of train and val (about a quarter of test images contain one): {held}",
    ]
