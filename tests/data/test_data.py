"""Reading shards: per-sample decoding, damaged data, ranks and workers, the DataModule."""
import io
import json
import os
import pickle
import struct
import tarfile
import time
import zlib
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmcap.data import CaptionDataModule, iter_samples, resolve_shards, try_decode
from mmcap.data.samples import MAX_CAPTION_CHARS
from mmcap.data.streams import batches_per_reader, eval_chunks, split_shards

# ---- helpers ----


def write_tar(path, members):
    """A tar from (name, bytes) pairs, exactly as given (no webdataset writer involved)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def encode(im, fmt, **kw):
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def decode(image: bytes, caption: bytes = b"a caption", ext: str = "png", **kw):
    return try_decode({"__key__": "k", ext: image, "txt": caption}, **kw)


def tiny_tokenizer(captions, max_tokens):
    """Stand-in for CaptionTokenizer: word lengths as ids, padded to the longest caption."""
    ids = [[len(w) for w in c.split()][:max_tokens] for c in captions]
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def loader_keys(loader):
    batches = list(loader)
    return [b["keys"] for b in batches], sum((Counter(b["skipped"]) for b in batches), Counter())


def datamodule(monkeypatch, rank, world, **kw):
    """A DataModule as rank `rank` of `world` sees it (RANK/WORLD_SIZE as a launcher sets them)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    kw = {"image_size": 16, "batch_size": 4, "num_workers": 2, "shuffle_buffer": 10, **kw}
    dm = CaptionDataModule(**kw)
    dm.setup("fit")
    return dm


# ---- one sample ----


def test_odd_but_valid_images_decode_to_correct_rgb():
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 200, 30] * 256)
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    cases = {
        "grayscale": (encode(Image.new("L", (4, 4), 77), "PNG"), (77, 77, 77)),
        "rgba": (encode(half_red, "PNG"), (255, 127, 127)),
        "transparent": (encode(Image.new("RGBA", (4, 4), (0, 0, 255, 0)), "PNG"), (255, 255, 255)),
        "palette": (encode(palette, "PNG"), (10, 200, 30)),
        "cmyk": (encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
        "16-bit": (encode(Image.fromarray(np.full((4, 4), 40000, np.uint16)), "PNG"), (156, 156, 156)),
    }
    for name, (data, rgb) in cases.items():
        example = decode(data)
        assert example.image.mode == "RGB", name
        assert all(abs(a - b) <= 2 for a, b in zip(example.image.getpixel((1, 1)), rgb)), (name, example.image.getpixel((1, 1)))


def test_exif_rotated_jpeg_is_turned_upright():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    example = decode(encode(im, "JPEG", exif=exif.tobytes(), quality=95), ext="jpg")
    assert example.image.size == (20, 40)
    top, bottom = example.image.getpixel((10, 5)), example.image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [50_000, 7_000])  # beyond PIL's own bomb limit; beyond only mmcap's
def test_decompression_bomb_is_rejected_from_its_header(side):
    started = time.perf_counter()
    assert decode(png_header_only(side, side)) == "too_large"
    assert time.perf_counter() - started < 1.0  # 7.5 G pixels were never allocated


def test_unusable_samples_give_their_reason():
    good = encode(Image.new("RGB", (8, 8), "red"), "PNG")
    assert decode(b"") == "empty_file"
    assert decode(good[:30]) == "unreadable_image"
    assert decode(b"not an image at all") == "unreadable_image"
    assert decode(good, b"\xff\xfe caption \xc3\x28") == "non_utf8"  # skipped and counted, not patched up
    assert decode(good, b" \n\t ") == "empty_caption"
    assert decode(good, max_image_bytes=10) == "too_large"
    assert try_decode({"__key__": "k", "txt": b"caption only"}) == "missing_image"
    assert try_decode({"__key__": "k", "png": good}) == "missing_caption"
    assert try_decode({"__key__": "k", "png": good, "json": b"{broken"}) == "bad_json"
    assert try_decode({"__key__": "k", "png": good, "json": b'{"captions": ["", " "]}'}) == "empty_caption"


def test_captions_come_from_json_then_txt_and_long_ones_are_cut():
    good = encode(Image.new("RGB", (8, 8), "red"), "PNG")
    both = {"__key__": "k", "png": good, "txt": b"from txt", "json": b'{"captions": ["one", "two"]}'}
    assert try_decode(both).captions == ["one", "two"]
    assert try_decode({**both, "json": b'{"caption": "single", "url": "http://x"}'}).captions == ["single"]
    assert try_decode({**both, "json": b'{"caption": null, "status": "success"}'}).captions == ["from txt"]
    assert try_decode({**both, "json": b"{broken"}).captions == ["from txt"]
    assert try_decode({**both, "json": b'{"captions": ["\\ud800 lone"]}'}).captions == ["? lone"]
    long = ("word " * 20_000).encode()  # 100,000 characters
    caption = decode(good, long).captions[0]
    assert len(caption) <= MAX_CAPTION_CHARS and long.decode().startswith(caption)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    image=st.one_of(
        st.binary(max_size=3000),
        st.tuples(st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]), st.binary(min_size=1, max_size=64),
                  st.integers(0, 10_000)).map(lambda t: _corrupt(*t)),
    ),
    caption=st.binary(max_size=300),
    extra=st.one_of(st.none(), st.binary(max_size=200)),
    ext=st.sampled_from(["jpg", "jpeg", "png", "webp"]),
)
def test_decoder_never_raises_on_arbitrary_bytes(image, caption, extra, ext):
    raw = {"__key__": "k", ext: image, "txt": caption}
    if extra is not None:
        raw["json"] = extra
    result = try_decode(raw, min_image_size=16)
    assert isinstance(result, str) or result.image.mode == "RGB"


def _corrupt(fmt: str, noise: bytes, at: int) -> bytes:
    """A valid small image with some bytes overwritten: reaches deep into the decoders."""
    data = bytearray(encode(Image.new("RGB", (24, 17), (200, 30, 90)), fmt))
    at %= len(data)
    data[at : at + len(noise)] = noise
    return bytes(data)


# ---- shards ----


def test_img2dataset_shards_read_as_they_are(tmp_path, tiny_image):
    def meta(i, caption):
        return json.dumps({"url": f"http://x/{i}.jpg", "key": f"{i:09d}", "status": "success", "error_message": None,
                           "width": 20, "height": 16, "original_width": 640, "original_height": 512, "exif": "{}",
                           "caption": caption, "sha256": "0" * 64}).encode()

    members = []
    for i in range(3):
        members += [(f"{i:09d}.jpg", tiny_image(i)), (f"{i:09d}.json", meta(i, None if i == 2 else f"caption {i}")),
                    (f"{i:09d}.txt", f"caption {i}".encode())]
    shard = write_tar(tmp_path / "00000.tar", members)
    examples = list(iter_samples(shard))
    assert [(e.key, e.captions) for e in examples] == [(f"{i:09d}", [f"caption {i}"]) for i in range(3)]
    assert examples[0].image.size == (20, 16)


def test_damaged_shard_reads_through_with_skip_counts(tmp_path, tiny_image, monkeypatch):
    evil = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(evil), "w"))

    good = [tiny_image(i) for i in range(8)]
    members = [
        ("s0.jpg", good[0]), ("s0.txt", b"ok 0"),
        ("s1.jpg", good[1][: len(good[1]) // 2]), ("s1.txt", b"corrupt jpeg"),
        ("s2.jpg", good[2]), ("s2.txt", b"   "),
        ("s3.pdf", b"%PDF-1.4 not an image"), ("s3.txt", b"no image"),
        ("s4.jpg", good[4]), ("s4.pyd", pickle.dumps(Evil())), ("s4.txt", b"ok 4"),
        ("s5.jpg", good[5]), ("s5.txt", b"ok 5"),
        ("s6.jpg", good[6] * 4), ("s6.txt", b"lost in the truncation"),
    ]
    data = open(write_tar(tmp_path / "damaged.tar", members), "rb").read()
    (tmp_path / "damaged.tar").write_bytes(data[: data.index(b"lost in") - 2000])  # cut inside s6.jpg
    write_tar(tmp_path / "fine.tar", [("s7.jpg", good[7]), ("s7.txt", b"ok 7")])

    for workers in (0, 2):
        dm = datamodule(monkeypatch, 0, 1, train_shards=str(tmp_path / "*.tar"), num_workers=workers)
        keys, skipped = loader_keys(dm.train_dataloader())
        assert sorted(sum(keys, [])) == ["s0", "s4", "s5", "s7"]
        assert skipped == {"unreadable_image": 1, "empty_caption": 1, "missing_image": 1, "truncated_shard": 1}
    assert not evil.exists()  # .pyd members are never loaded, let alone unpickled


def test_shard_cut_between_members_counts_as_truncated(tmp_path, tiny_image):
    shard = write_tar(tmp_path / "cut.tar", [("a.jpg", tiny_image(0)), ("a.txt", b"a"), ("b.jpg", tiny_image(1)), ("b.txt", b"b")])
    data = open(shard, "rb").read()
    end_of_a = 512 * (1 + -(-len(tiny_image(0)) // 512)) + 1024  # two headers, a.jpg's blocks, a.txt's block
    (tmp_path / "cut.tar").write_bytes(data[:end_of_a])
    skipped = Counter()
    assert [e.key for e in iter_samples(shard, skipped=skipped)] == ["a"]
    assert skipped == {"truncated_shard": 1}


def test_members_named_with_dotdot_are_never_written_to_disk(tmp_path, tiny_image, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    shard = write_tar(tmp_path / "evil.tar", [("../../evil.jpg", tiny_image(0)), ("../../evil.txt", b"escaped?"),
                                              ("/tmp/abs_evil.txt", b"x")])
    before = sorted(p for p in tmp_path.rglob("*"))
    examples = list(iter_samples(shard))
    assert [e.key for e in examples] == ["../../evil"]  # read into memory only
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not os.path.exists("/tmp/abs_evil.txt")


def test_shard_patterns_that_match_nothing_fail_at_once_naming_them(tmp_path, make_caption_shards):
    pattern, _ = make_caption_shards(1, 2)
    with pytest.raises(FileNotFoundError, match="nothing-here-"):
        resolve_shards(str(tmp_path / "nothing-here-*.tar"))
    with pytest.raises(FileNotFoundError, match="gone-000001.tar"):
        CaptionDataModule(train_shards=[pattern, str(tmp_path / "gone-{000001..000002}.tar")]).setup("fit")
    with pytest.raises(IsADirectoryError, match="train-"):
        resolve_shards(str(tmp_path))
    (tmp_path / "junk.tar").write_bytes(b"\x00junk" * 300)
    with pytest.raises(ValueError, match="junk.tar"):
        CaptionDataModule(val_shards=str(tmp_path / "junk.tar")).val_dataloader()
    assert resolve_shards(f"{pattern}::pipe:cat x.tar") == [str(tmp_path / "shards" / "train-000000.tar"), "pipe:cat x.tar"]


# ---- ranks and workers ----


def test_epoch_mode_two_ranks_two_workers_sees_each_sample_once(make_caption_shards, monkeypatch):
    pattern, captions = make_caption_shards(8, 6)
    seen, batches = Counter(), []
    for rank in range(2):
        loader = datamodule(monkeypatch, rank, 2, train_shards=pattern).train_dataloader()
        keys, _ = loader_keys(loader)
        batches.append((len(keys), len(loader)))
        seen.update(sum(keys, []))
    assert batches == [(6, 6), (6, 6)]  # 4 readers x 12 samples / batch 4
    assert seen == Counter({k: 1 for k in captions})


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_give_ranks_equal_batches_and_drop_nothing(make_caption_shards, monkeypatch, workers):
    pattern, captions = make_caption_shards(3, 6)
    seen, batches = Counter(), []
    for rank in range(2):
        loader = datamodule(monkeypatch, rank, 2, train_shards=pattern, num_workers=workers).train_dataloader()
        keys, _ = loader_keys(loader)
        batches.append((len(keys), len(loader)))
        seen.update(sum(keys, []))
    assert batches[0] == batches[1] and batches[0][0] == batches[0][1]
    assert set(seen) == set(captions)


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=20), readers=st.integers(1, 8),
       batch=st.integers(1, 16), seed=st.integers(0, 1000))
def test_every_reader_fits_its_shards_in_the_common_batch_count(counts, readers, batch, seed):
    import random

    order = list(range(len(counts)))
    random.Random(seed).shuffle(order)
    target = batches_per_reader(counts, readers, batch)
    covered = set()
    for r in range(readers):
        mine = split_shards(order, r, readers, share=True)
        assert mine and -(-sum(counts[i] for i in mine) // batch) <= target
        covered |= set(mine)
    assert covered == set(order)


def test_resampled_mode_gives_every_rank_its_share_of_samples_per_epoch(make_caption_shards, monkeypatch):
    pattern, captions = make_caption_shards(4, 5)
    for rank in range(2):
        loader = datamodule(monkeypatch, rank, 2, train_shards=pattern, resampled=True, samples_per_epoch=20).train_dataloader()
        assert len(loader) == 3  # ceil(20 / (2 ranks x batch 4))
        for _ in range(2):
            keys, _ = loader_keys(loader)
            assert [len(k) for k in keys] == [4, 4, 4] and set(sum(keys, [])) <= set(captions)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (4, 1)])
def test_eval_sees_each_sample_exactly_once_with_equal_batches(make_caption_shards, monkeypatch, world, workers):
    pattern, captions = make_caption_shards(3, 7, name="val")
    order, per_rank = [], []
    for rank in range(world):
        loader = datamodule(monkeypatch, rank, world, val_shards=pattern, num_workers=workers).val_dataloader()
        batches = list(loader)
        per_rank.append((len(batches), len(loader)))
        for b in batches:
            assert b["references"] == [captions[k] for k in b["keys"]]  # all references, in order
            assert b["captions"] == [captions[k][0] for k in b["keys"]]
            assert b["pixels"].shape == (len(b["keys"]), 3, 16, 16)
        order += sum((b["keys"] for b in batches), [])
    assert order == sorted(captions)  # rank by rank, in shard order, each sample once
    assert len(set(per_rank)) == 1 and per_rank[0][0] == per_rank[0][1]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 500), world=st.integers(1, 8), batch=st.integers(1, 64))
def test_eval_chunks_cover_each_index_once_with_equal_counts(n, world, batch):
    chunks = eval_chunks(n, world, batch)
    assert len(chunks) == world and len({len(c) for c in chunks}) == 1
    flat = [c for rank in chunks for c in rank]
    assert [i for start, end in flat for i in range(start, end)] == list(range(n))
    assert all(end - start <= batch for start, end in flat)


# ---- the DataModule ----


def test_batches_carry_tokens_when_a_tokenizer_is_set(make_caption_shards, monkeypatch):
    pattern, captions = make_caption_shards(2, 3)
    dm = datamodule(monkeypatch, 0, 1, train_shards=pattern, val_shards=pattern, max_caption_tokens=2)
    dm.tokenizer = tiny_tokenizer
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"pixels", "captions", "references", "keys", "skipped", "input_ids", "attention_mask"}
        assert batch["pixels"].dtype == torch.float32 and batch["input_ids"].shape == (len(batch["keys"]), 2)
        assert all(c in captions[k] for c, k in zip(batch["captions"], batch["keys"]))


def test_epochs_reshuffle_reproducibly(make_caption_shards, monkeypatch):
    pattern, captions = make_caption_shards(4, 5)

    def epoch_order(epoch):
        loader = datamodule(monkeypatch, 0, 1, train_shards=pattern, num_workers=0).train_dataloader()
        loader.set_epoch(epoch)
        return sum(loader_keys(loader)[0], [])

    first, again, second = epoch_order(0), epoch_order(0), epoch_order(1)
    assert first == again and first != second and sorted(first) == sorted(second) == sorted(captions)


def test_train_captions_lists_every_caption(make_caption_shards):
    pattern, captions = make_caption_shards(2, 3)
    dm = CaptionDataModule(train_shards=pattern)
    assert sorted(dm.train_captions()) == sorted(c for caps in captions.values() for c in caps)
    assert len(list(dm.train_captions(limit=5))) == 5


class Probe(L.LightningModule):
    """Records what the loops hand it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_keys, self.val_keys = [], []

    def training_step(self, batch, batch_idx):
        self.train_keys.append((self.current_epoch, batch["keys"]))
        return (self.weight * batch["pixels"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["keys"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_reshuffles_each_epoch_and_validates_every_sample(make_caption_shards):
    train, captions = make_caption_shards(4, 5)
    val, val_captions = make_caption_shards(2, 3, name="val")
    dm = CaptionDataModule(train_shards=train, val_shards=val, image_size=16, batch_size=4, num_workers=0)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=dm)
    epochs = [sum((k for e, k in probe.train_keys if e == epoch), []) for epoch in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(captions) and epochs[0] != epochs[1]
    assert sorted(probe.val_keys) == sorted(list(val_captions) * 2)


class DDPProbe(Probe):
    """Logs with a collective in every validation step: ranks out of step would hang here."""

    def __init__(self, out):
        super().__init__()
        self.out = str(out)

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_seen", float(len(batch["keys"])), sync_dist=True, reduce_fx="sum")

    def on_fit_end(self):
        with open(os.path.join(self.out, f"rank{self.global_rank}.json"), "w") as f:
            json.dump({"train": self.train_keys, "val": self.val_keys}, f)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MMCAP_SLOW_TESTS"), reason="real DDP, 2 processes, ~30 s: MMCAP_SLOW_TESTS=1")
def test_real_ddp_with_uneven_shards_stays_in_step(make_caption_shards, tmp_path):
    train, captions = make_caption_shards(3, 10)
    val, val_captions = make_caption_shards(3, 5, name="val")
    dm = CaptionDataModule(train_shards=train, val_shards=val, image_size=16, batch_size=4, num_workers=2)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(DDPProbe(tmp_path), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"])
    for epoch in (0, 1):
        assert {k for r in ranks for e, keys in r["train"] if e == epoch for k in keys} == set(captions)
    assert Counter(k for r in ranks for k in r["val"]) == {k: 2 for k in val_captions}  # once per epoch
