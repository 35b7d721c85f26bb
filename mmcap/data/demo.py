"""A synthetic captioning dataset small enough to learn in minutes on a laptop CPU.

Each 128 x 128 JPEG shows one or two coloured shapes on a light, plain or noisy background. The
captions are generated from the scene with a tiny regular grammar, so every reference is exactly
right and a model can get them exactly right too:

    one shape:  "a large red circle on the left", "there is a large red circle on the left",
                "on the left there is a large red circle", "a picture of a large red circle on the left"
    two shapes: "a small blue square to the left of a large green triangle",
                "a large green triangle to the right of a small blue square", (+ "there is ..." forms)
                or "... above ..." / "... below ..." for a vertical pair.

Some colour/shape combinations (`HELD_OUT`) never occur in train or val; about a quarter of the
test images contain one, so test scores show whether a model composes colour and shape.
Everything is derived from the seed: the same seed gives the same bytes.

`make_demo(kind="glyphs")` writes the second kind (`demo_glyphs.py`: 64 px stroke-drawn marks on
textured backgrounds, its own vocabulary), for checking defaults on data they were not tuned on.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from mmcap.data import demo_glyphs
from mmcap.data.shards import Sample, write_shards

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 25),
    "purple": (145, 55, 195),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.11, "large": 0.18}  # radius as a fraction of the image side
HELD_OUT = (("red", "triangle"), ("green", "star"), ("blue", "circle"), ("yellow", "square"))
# Single shapes sit at one of five clearly separated places; pairs side by side or one above the other.
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "middle": (0.5, 0.5)}
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "middle": "in the middle"}
JITTER = 0.02  # keeps a gap of a few pixels between the shapes of a pair, whatever their size
HELD_OUT_FRACTION = 0.25  # of test images: enough to measure, few enough that most of test is in-distribution
VOCABULARY = sorted(
    set(COLOURS) | set(SHAPES) | set(SIZES)
    | set(" ".join(PLACE_PHRASES.values()).split())
    | {"a", "there", "is", "picture", "of", "to", "the", "left", "right", "above", "below"}
)
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
KINDS = ("shapes", "glyphs")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    place: str  # left/right/top/bottom/middle
    x: float  # centre, as fractions of the image side
    y: float

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # pairs: first is left (or top), second right (or bottom)
    background: int  # grey level
    noisy: bool

    @property
    def held_out(self) -> bool:
        return any((s.colour, s.shape) in HELD_OUT for s in self.shapes)

    def captions(self) -> list[str]:
        if len(self.shapes) == 1:
            s = self.shapes[0]
            where = PLACE_PHRASES[s.place]
            return [f"{s.phrase()} {where}", f"there is {s.phrase()} {where}", f"{where} there is {s.phrase()}",
                    f"a picture of {s.phrase()} {where}"]
        a, b = self.shapes
        before, after = ("to the left of", "to the right of") if a.place == "left" else ("above", "below")
        return [f"{a.phrase()} {before} {b.phrase()}", f"{b.phrase()} {after} {a.phrase()}",
                f"there is {a.phrase()} {before} {b.phrase()}", f"there is {b.phrase()} {after} {a.phrase()}"]


def sample_scene(rng: random.Random, held_out: bool = False) -> Scene:
    """A random scene; with `held_out`, one of its shapes has a held-out colour/shape pair."""
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    if rng.random() < 0.5:
        places = [rng.choice(list(POSITIONS))]
    else:
        places = ["left", "right"] if rng.random() < 0.5 else ["top", "bottom"]
    kinds = rng.sample(seen, len(places))
    if held_out:
        kinds[rng.randrange(len(kinds))] = rng.choice(HELD_OUT)
    shapes = []
    for (colour, shape), place in zip(kinds, places):
        x, y = POSITIONS[place]
        shapes.append(Shape(colour, shape, rng.choice(list(SIZES)), place,
                            x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER)))
    return Scene(tuple(shapes), background=rng.randint(195, 250), noisy=rng.random() < 0.5)


def draw_scene(scene: Scene, image_size: int = 128, noise_seed: int = 0) -> Image.Image:
    """Shapes drawn at twice the size and scaled down (smooth edges), then optional noise."""
    big = 2 * image_size
    im = Image.new("RGB", (big, big), (scene.background,) * 3)
    draw = ImageDraw.Draw(im)
    for s in scene.shapes:
        cx, cy, r = s.x * big, s.y * big, SIZES[s.size] * big
        if s.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[s.colour])
        else:
            draw.polygon(_outline(s.shape, cx, cy, r), fill=COLOURS[s.colour])
    im = im.reduce(2)  # 2x2 box average: anti-aliased edges
    if scene.noisy:
        pixels = np.asarray(im, dtype=np.float32)
        pixels += 10 * np.random.default_rng(noise_seed).standard_normal(pixels.shape, dtype=np.float32)
        im = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return im


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up, centred on its bounding box
        return [(cx, cy - r), (cx + 1.1 * r, cy + 0.9 * r), (cx - 1.1 * r, cy + 0.9 * r)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r * 1.1 if i % 2 == 0 else r * 0.45
            angle = np.pi * (i / 5 - 0.5)
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _int_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class DemoKind(NamedTuple):
    """What differs between demo kinds: scenes, drawing, defaults, description."""

    sample_scene: Callable
    draw_scene: Callable
    meta: Callable  # scene -> the json member's extra fields
    image_size: int
    n_train: int
    readme_lines: Callable[[int], list[str]]


def _shapes_meta(scene: Scene) -> dict:
    return {"held_out": scene.held_out, "shapes": [asdict(s) for s in scene.shapes]}


def _shapes_readme(image_size: int) -> list[str]:
    held = ", ".join(f"{c} {s}" for c, s in HELD_OUT)
    return [
        f"{image_size}x{image_size} JPEG scenes of one or two coloured shapes on a light",
        "plain or noisy background, each with 4 reference captions generated from the scene.",
        "",
        f"colours: {', '.join(COLOURS)}",
        f"shapes:  {', '.join(SHAPES)}",
        f"sizes:   {', '.join(SIZES)}",
        f"places:  {', '.join(PLACE_PHRASES.values())}; pairs: 'to the left of' / 'above' (and the reverse forms)",
        f"vocabulary ({len(VOCABULARY)} words): {' '.join(VOCABULARY)}",
        "",
        f"held out of train and val (about {HELD_OUT_FRACTION:.0%} of test images contain one): {held}",
    ]


DEMO_KINDS = {
    "shapes": DemoKind(sample_scene, draw_scene, _shapes_meta, 128, 6000, _shapes_readme),
    "glyphs": DemoKind(demo_glyphs.sample_scene, demo_glyphs.draw_scene, lambda scene: scene.meta(),
                       demo_glyphs.DEFAULT_IMAGE_SIZE, demo_glyphs.DEFAULT_TRAIN, demo_glyphs.readme_lines),
}


def demo_kind(kind: str) -> DemoKind:
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo kind {kind!r}; known: {sorted(DEMO_KINDS)}")
    return DEMO_KINDS[kind]


def scenes(split: str, n: int, seed: int = 0, kind: str = "shapes") -> list:
    sample = demo_kind(kind).sample_scene
    rng = random.Random(_int_seed(seed, split) if kind == "shapes" else _int_seed(seed, split, kind))
    held = split == "test"
    return [sample(rng, held_out=held and rng.random() < HELD_OUT_FRACTION) for _ in range(n)]


def make_demo(
    out_dir: str | Path = "data/demo",
    seed: int = 0,
    n_train: int | None = None,
    n_val: int = 300,
    n_test: int = 300,
    image_size: int | None = None,
    train_shards: int = 8,
    eval_shards: int = 2,
    force: bool = False,
    kind: str = "shapes",
) -> dict:
    """Write the demo shards, `samples/` (8 test JPEGs + captions.json) and README.txt.

    `kind` is "shapes" (128 px, 6,000 training images by default) or "glyphs" (64 px, 8,000).
    Returns the contents of `demo.json`, the marker written last: when it exists with the same
    settings the call returns at once (unless `force`).
    """
    spec = demo_kind(kind)
    n_train = spec.n_train if n_train is None else n_train
    image_size = spec.image_size if image_size is None else image_size
    out = Path(out_dir)
    settings = {"format": FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test,
                "image_size": image_size, "train_shards": train_shards, "eval_shards": eval_shards}
    if kind != "shapes":  # the shapes demo's settings (and so its marker) stay as they were
        settings["kind"] = kind
    marker = out / "demo.json"
    if not force and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("settings") == settings:
            return done
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    counts = {}
    sizes = {"train": (n_train, train_shards), "val": (n_val, eval_shards), "test": (n_test, eval_shards)}
    for split, (n, shards) in sizes.items():
        for old in out.glob(f"{split}-*.tar"):
            old.unlink()
        samples = _split_samples(split, n, seed, image_size, kind)
        per_shard = max(1, -(-n // shards))
        summary = write_shards(samples, str(out / f"{split}-%06d.tar"), maxcount=per_shard, progress=False)
        counts[split] = {"samples": summary.samples, "shards": len(summary.shards)}
    _write_examples(out / "samples", seed, image_size, kind)
    (out / "README.txt").write_text(_readme(settings, counts, kind))
    done = {"settings": settings, "splits": counts}
    marker.write_text(json.dumps(done, indent=1))
    return {**done, "seconds": round(time.perf_counter() - started, 2)}


def demo_is_complete(out_dir: str | Path) -> bool:
    """Has a demo (any settings) been written completely to `out_dir`?"""
    return (Path(out_dir) / "demo.json").is_file()


def _split_samples(split: str, n: int, seed: int, image_size: int, kind: str = "shapes") -> list[Sample]:
    spec = demo_kind(kind)
    samples = []
    for i, scene in enumerate(scenes(split, n, seed, kind)):
        image = spec.draw_scene(scene, image_size, noise_seed=_int_seed(seed, split, i))
        samples.append(Sample(key=f"{split}_{i:05d}", image=_jpeg(image), captions=scene.captions(),
                              meta=spec.meta(scene)))
    return samples


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


def _write_examples(folder: Path, seed: int, image_size: int, kind: str = "shapes", n: int = 8) -> None:
    """The first test images, a quarter of them with held-out combinations, as loose JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    draw = demo_kind(kind).draw_scene
    test = list(enumerate(scenes("test", 200, seed, kind)))
    held = [t for t in test if t[1].held_out][: n // 4]
    chosen = sorted(held + [t for t in test if not t[1].held_out][: n - len(held)], key=lambda t: t[0])
    references = {}
    for i, scene in chosen:
        name = f"test_{i:05d}.jpg"
        (folder / name).write_bytes(_jpeg(draw(scene, image_size, noise_seed=_int_seed(seed, "test", i))))
        references[name] = scene.captions()
    (folder / "captions.json").write_text(json.dumps(references, indent=1))


def _readme(settings: dict, counts: dict, kind: str = "shapes") -> str:
    lines = [
        f"mmcap demo dataset, kind {kind} (synthetic, generated by `mmcap data demo`)",
        "",
        *demo_kind(kind).readme_lines(settings["image_size"]),
        "",
        "files:",
    ]
    for split, c in counts.items():
        lines.append(f"  {split}-NNNNNN.tar  {c['samples']} samples in {c['shards']} shards "
                     "(KEY.jpg, KEY.txt, KEY.json with captions, shapes, held_out)")
    lines += [
        "  shards.json      sample count per shard",
        "  samples/         8 test images as .jpg, references in samples/captions.json",
        "  demo.json        generation settings; regenerate with `mmcap data demo --out DIR --force`",
        "",
        f"seed {settings['seed']}: the same seed always gives the same bytes.",
    ]
    return "\n".join(lines) + "\n"
