"""The synthetic demo set: reproducible, held-out combinations, captions that match the pixels."""
import json
import re
from collections import Counter

import numpy as np
import pytest

from mmcap.data import CaptionDataModule, iter_samples
from mmcap.training.data_cli import data_main
from mmcap.data.demo import COLOURS, HELD_OUT, VOCABULARY, make_demo
from mmcap.data.shardlist import SAMPLE_MEMBERS
from mmcap.data.samples import SkipCounter, read_shards


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, n_train=400, n_val=40, n_test=120)
    return out


def metas(demo, split):
    raws = read_shards(sorted(str(p) for p in demo.glob(f"{split}-*.tar")), SkipCounter(), members=SAMPLE_MEMBERS)
    return [json.loads(r["json"]) for r in raws]


def test_same_seed_same_bytes_and_another_seed_differs(demo, tmp_path):
    make_demo(tmp_path / "again", n_train=400, n_val=40, n_test=120)
    files = sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert all((demo / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    make_demo(tmp_path / "other", seed=1, n_train=400, n_val=40, n_test=120)
    assert (tmp_path / "other" / "train-000000.tar").read_bytes() != (demo / "train-000000.tar").read_bytes()


def test_layout_of_the_directory(demo):
    assert len(list(demo.glob("train-*.tar"))) == 8  # 2 ranks x 2 workers read distinct shards
    assert len(list(demo.glob("val-*.tar"))) == len(list(demo.glob("test-*.tar"))) == 2
    samples = json.loads((demo / "samples" / "captions.json").read_text())
    assert len(samples) == 8 and all((demo / "samples" / name).is_file() for name in samples)
    assert "held out" in (demo / "README.txt").read_text()
    assert json.loads((demo / "demo.json").read_text())["splits"]["train"] == {"samples": 400, "shards": 8}


def test_held_out_combinations_appear_only_in_test(demo):
    def combos(split):
        return Counter((s["colour"], s["shape"]) for m in metas(demo, split) for s in m["shapes"])

    held = set(HELD_OUT)
    assert not held & set(combos("train")) and not held & set(combos("val"))
    assert held & set(combos("test"))
    flags = [m["held_out"] for m in metas(demo, "test")]
    assert 0.1 < sum(flags) / len(flags) < 0.45


def test_captions_use_a_small_vocabulary_and_several_exact_paraphrases(demo):
    for split in ("train", "test"):
        for m in metas(demo, split):
            assert 3 <= len(m["captions"]) <= 5 and len(set(m["captions"])) == len(m["captions"])
            assert {w for c in m["captions"] for w in c.split()} <= set(VOCABULARY)
    assert len(VOCABULARY) <= 40


SINGLE = re.compile(r"^a (small|large) (\w+) (\w+) (?:on the|at the|in the) (left|right|top|bottom|middle)$")
PAIR = re.compile(r"^a (small|large) (\w+) (\w+) (to the left of|above) a (small|large) (\w+) (\w+)$")


# area / radius**2 of each drawn shape (square half-side 0.85 r, triangle 2.2 r wide and 1.9 r tall,
# star 1.1 r / 0.45 r): turns a pixel area back into the radius that sets "small" or "large"
AREA_FACTOR = {"circle": np.pi, "square": 4 * 0.85**2, "triangle": 2.09, "star": 1.455}


def shape_at(pixels: np.ndarray, box: tuple[slice, slice]):
    """(colour, shape, radius, centre) of the one shape inside `box`, read from the pixels alone."""
    region = pixels[box].astype(float)
    names = list(COLOURS)
    dist = np.stack([np.linalg.norm(region - np.array(COLOURS[n]), axis=-1) for n in names])
    nearest, best = dist.argmin(0), dist.min(0)
    saturated = region.max(-1) - region.min(-1) > 70  # the background is grey
    counts = [int(((nearest == i) & saturated & (best < 90)).sum()) for i in range(len(names))]
    colour = names[int(np.argmax(counts))]
    mask = (nearest == names.index(colour)) & saturated & (best < 90)
    ys, xs = np.nonzero(mask)
    bbox = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = bbox.mean()  # measured: square 0.94-1, circle 0.75-0.81, triangle 0.51-0.59, star 0.38-0.49
    bottom = bbox[-max(1, len(bbox) // 5) :].mean()  # flat-bottomed triangle 0.79-0.98, star 0.23-0.36
    shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle" if bottom > 0.55 else "star"
    radius = np.sqrt(mask.sum() / AREA_FACTOR[shape])  # about 14 px small, 23 px large
    centre = ((xs.mean() + box[1].start) / pixels.shape[1], (ys.mean() + box[0].start) / pixels.shape[0])
    return colour, shape, radius, centre


def test_captions_match_the_drawn_pixels(demo):
    checked = 0
    for example in iter_samples(str(demo / "test-*.tar")):
        pixels = np.asarray(example.image)
        h, w = pixels.shape[:2]
        caption = example.captions[0]
        if m := SINGLE.match(caption):
            size, colour, shape, place = m.groups()
            got_colour, got_shape, radius, (x, y) = shape_at(pixels, (slice(0, h), slice(0, w)))
            assert (got_colour, got_shape) == (colour, shape), caption
            expected = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
                        "middle": (0.5, 0.5)}[place]
            assert abs(x - expected[0]) < 0.08 and abs(y - expected[1]) < 0.1, caption
            sizes = [(size, radius)]
        else:
            m = PAIR.match(caption)
            assert m, caption
            size, colour, shape, relation, size2, colour2, shape2 = m.groups()
            halves = ((slice(0, h), slice(0, w // 2)), (slice(0, h), slice(w // 2, w))) if relation == "to the left of" \
                else ((slice(0, h // 2), slice(0, w)), (slice(h // 2, h), slice(0, w)))
            first, second = shape_at(pixels, halves[0]), shape_at(pixels, halves[1])
            assert first[:2] == (colour, shape) and second[:2] == (colour2, shape2), caption
            sizes = [(size, first[2]), (size2, second[2])]
        assert all((radius > 18.5) == (word == "large") for word, radius in sizes), (caption, sizes)
        checked += 1
    assert checked == 120


def test_cli_and_datamodule_use_an_existing_demo(demo, capsys):
    assert data_main(["demo", "--out", str(demo), "--n-train", "400", "--n-val", "40", "--n-test", "120"]) == 0
    assert "train 400 samples / 8 shards" in capsys.readouterr().out
    dm = CaptionDataModule(demo_dir=str(demo), image_size=64, batch_size=8, num_workers=0)
    dm.setup("fit")  # the demo exists: used as it is, not regenerated at full size
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (8, 3, 64, 64) and all(set(c.split()) <= set(VOCABULARY) for c in batch["captions"])
    assert sum(len(b["keys"]) for b in dm.test_dataloader()) == 120


def test_glyphs_kind_differs_in_size_vocabulary_and_holds_out_pairs(tmp_path):
    """The second demo kind: 64 px images, its own words, held-out colour/glyph pairs only in test,
    captions naming exactly the marks drawn, and the same bytes for the same seed."""
    from PIL import Image

    from mmcap.data import demo_glyphs
    from mmcap.data.demo import VOCABULARY as SHAPE_WORDS

    out = tmp_path / "glyphs"
    assert data_main(["demo", "--kind", "glyphs", "--out", str(out), "--n-train", "200", "--n-val", "20",
                      "--n-test", "200"]) == 0
    examples = {split: list(iter_samples(str(out / f"{split}-*.tar"))) for split in ("train", "test")}
    assert {ex.image.size for exs in examples.values() for ex in exs} == {(64, 64)}
    words = {w for exs in examples.values() for ex in exs for c in ex.captions for w in c.split()}
    assert words <= set(demo_glyphs.vocabulary()) | {"mark,", "left,", "right,", "centre,"}
    assert {"zigzag", "beside", "corner"} <= words and not {"circle", "triangle", "square"} & words
    assert len(words - set(SHAPE_WORDS)) >= 10
    pairs = {split: Counter((m["colour"], m["glyph"]) for meta in metas(out, split) for m in meta["marks"])
             for split in ("train", "test")}
    assert not set(pairs["train"]) & set(demo_glyphs.HELD_OUT)
    assert set(pairs["test"]) & set(demo_glyphs.HELD_OUT)
    for meta, ex in zip(metas(out, "test"), examples["test"]):
        names = [f"{m['colour']} {m['glyph']}" for m in meta["marks"]]
        assert all(name in ex.captions[0] for name in names) and len(ex.captions) == 4
    make_demo(tmp_path / "again", kind="glyphs", n_train=200, n_val=20, n_test=200)
    assert (out / "test-000000.tar").read_bytes() == (tmp_path / "again" / "test-000000.tar").read_bytes()
    assert Image.open(out / "samples" / sorted(p.name for p in (out / "samples").glob("*.jpg"))[0]).size == (64, 64)
