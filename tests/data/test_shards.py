"""Writing shards: round trips, reproducibility, atomic shards, every source, the CLI."""
import csv
import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from mmcap.data import count_samples, iter_samples, write_shards
from mmcap.training.data_cli import shards_main
from mmcap.data.samples import SkipCounter, read_shards
from mmcap.data.shards import Sample, indexed_count, read_members, sanitize_key
from mmcap.data.sources import coco_samples, folder_samples, karpathy_samples, table_samples


def test_round_trip_keeps_every_caption_and_image_byte(tmp_path, tiny_image):
    images = [tiny_image(0, "JPEG"), tiny_image(1, "PNG"), tiny_image(2, "WEBP"), tiny_image(3, "JPEG")]
    captions = [["a red thing"], ["ünïcödé caption — ok", "second one", "second one"], ["x"], ["one", "two", "three"]]
    samples = [Sample(f"k{i}", im, caps) for i, (im, caps) in enumerate(zip(images, captions))]
    summary = write_shards(samples, str(tmp_path / "s-%06d.tar"), maxcount=3, progress=False)
    assert summary.samples == 4 and len(summary.shards) == 2 and not summary.skipped

    raws = list(read_shards(summary.shards, SkipCounter()))
    assert [r["__key__"] for r in raws] == ["k0", "k1", "k2", "k3"]
    for raw, image, ext in zip(raws, images, ["jpg", "png", "webp", "jpg"]):
        assert raw[ext] == image  # copied byte for byte
    decoded = list(iter_samples(str(tmp_path / "s-*.tar")))
    assert [d.captions for d in decoded] == captions  # duplicates and order kept
    assert decoded[0].image.size == (20, 16) and decoded[0].image.mode == "RGB"


def test_writing_is_reproducible_and_leaves_no_temporary_files(tmp_path, tiny_image):
    samples = [Sample(f"k{i}", tiny_image(i), [f"c{i}"]) for i in range(5)]
    a = write_shards(samples, str(tmp_path / "a" / "s-%06d.tar"), maxcount=2, progress=False)
    b = write_shards(samples, str(tmp_path / "b" / "s-%06d.tar"), maxcount=2, progress=False)
    assert [Path(p).read_bytes() for p in a.shards] == [Path(p).read_bytes() for p in b.shards]
    with tarfile.open(a.shards[0]) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}  # no wall-clock time in the bytes
    assert sorted(os.listdir(tmp_path / "a")) == ["s-000000.tar", "s-000001.tar", "s-000002.tar", "shards.json"]


def test_shards_split_by_count_and_size_and_index_counts_them(tmp_path, tiny_image):
    samples = [Sample(f"k{i}", tiny_image(i, size=(64, 64)), ["c"]) for i in range(10)]
    summary = write_shards(samples, str(tmp_path / "s-%06d.tar"), maxcount=4, progress=False)
    assert [count_samples(p) for p in summary.shards] == [4, 4, 2]
    assert [indexed_count(p) for p in summary.shards] == [4, 4, 2]

    one = len(list(read_members(summary.shards[0]))[0][1])
    sized = write_shards(samples, str(tmp_path / "z-%06d.tar"), maxcount=100, maxsize=3 * one + 6 * 1024, progress=False)
    assert len(sized.shards) > 1 and sum(count_samples(p) for p in sized.shards) == 10
    assert all(os.path.getsize(p) <= 3 * one + 6 * 1024 + 10240 for p in sized.shards)


def test_index_entries_go_stale_when_a_shard_changes(tmp_path, tiny_image):
    summary = write_shards([Sample(f"k{i}", tiny_image(i), ["c"]) for i in range(3)], str(tmp_path / "s-%06d.tar"),
                           progress=False)
    shard = summary.shards[0]
    write_shards([Sample("other", tiny_image(9), ["c"])], str(tmp_path / "t-%06d.tar"), progress=False)
    Path(shard).write_bytes(Path(tmp_path / "t-000000.tar").read_bytes())  # replaced behind the index's back
    assert indexed_count(shard) is None and count_samples(shard) == 1


def test_keys_are_sanitized_and_unique(tmp_path, tiny_image):
    names = ["img.01", "img.01", "dir/sub file.png", "../../etc/passwd", "", "a" * 300]
    summary = write_shards([Sample(n, tiny_image(i), ["c"]) for i, n in enumerate(names)], str(tmp_path / "s-%06d.tar"),
                           progress=False)
    keys = [name.split(".")[0] for name, _ in read_members(summary.shards[0]) if name.endswith(".txt")]
    assert keys == ["img_01", "img_01_2", "dir_sub_file_png", "etc_passwd", "sample", "a" * 64]
    assert sanitize_key("x.y.z") == "x_y_z"


def test_unusable_samples_are_skipped_by_reason(tmp_path, tiny_image):
    (tmp_path / "broken.jpg").write_bytes(tiny_image(0)[:40])
    (tmp_path / "good.png").write_bytes(tiny_image(1, "PNG"))
    samples = [
        Sample("gone", tmp_path / "missing.jpg", ["c"]),
        Sample("broken", tmp_path / "broken.jpg", ["c"]),
        Sample("blank", tmp_path / "good.png", ["  ", "\n"]),
        Sample("nocaption", tmp_path / "good.png", None),
        Sample("good", tmp_path / "good.png", ["  a   caption\nwith lines "]),
    ]
    summary = write_shards(samples, str(tmp_path / "out" / "s-%06d.tar"), progress=False)
    assert summary.samples == 1
    assert summary.skipped == {"missing_file": 1, "unreadable_image": 1, "empty_caption": 1, "missing_caption": 1}
    assert "1 samples in 1 shards" in str(summary) and "missing_file=1" in str(summary)
    assert [e.captions for e in iter_samples(summary.shards)] == [["a caption with lines"]]


def test_resize_max_shrinks_large_images_only(tmp_path, tiny_image):
    big, small = tiny_image(0, "PNG", size=(300, 150)), tiny_image(1, "PNG", size=(40, 30))
    summary = write_shards([Sample("big", big, ["c"]), Sample("small", small, ["c"])], str(tmp_path / "s-%06d.tar"),
                           resize_max=100, progress=False)
    members = dict(read_members(summary.shards[0]))
    assert Image.open(io.BytesIO(members["big.jpg"])).size == (100, 50)
    assert members["small.png"] == small


def test_other_formats_are_stored_losslessly_as_png(tmp_path, tiny_image):
    summary = write_shards([Sample("b", tiny_image(0, "BMP"), ["c"])], str(tmp_path / "s-%06d.tar"), progress=False)
    members = dict(read_members(summary.shards[0]))
    assert list(Image.open(io.BytesIO(members["b.png"])).getdata()) == list(Image.open(io.BytesIO(tiny_image(0, "BMP"))).getdata())


def test_a_failed_run_leaves_only_complete_shards(tmp_path, tiny_image):
    def samples():
        for i in range(5):
            yield Sample(f"k{i}", tiny_image(i), ["c"])
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shards(samples(), str(tmp_path / "s-%06d.tar"), maxcount=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["s-000000.tar", "s-000001.tar", "shards.json"]


@pytest.mark.slow
def test_sigkill_never_leaves_a_partial_shard_and_rerun_completes(tmp_path, tiny_image):
    out, started = tmp_path / "out", tmp_path / "second-shard-started"

    def samples(stall: bool):
        for i in range(6):
            if stall and i == 3:  # the second shard is open and half written
                started.touch()
                time.sleep(60)
            yield Sample(f"k{i}", tiny_image(i), ["c"])

    pid = os.fork()  # a child process we can SIGKILL mid-shard (cheaper than a fresh interpreter)
    if pid == 0:
        try:
            write_shards(samples(stall=True), str(out / "s-%06d.tar"), maxcount=2, progress=False)
        finally:
            os._exit(0)
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert sorted(os.listdir(out)) == ["s-000000.tar", "s-000001.tar.tmp", "shards.json"]

    write_shards(samples(stall=False), str(out / "s-%06d.tar"), maxcount=2, progress=False)
    assert sorted(os.listdir(out)) == ["s-000000.tar", "s-000001.tar", "s-000002.tar", "shards.json"]
    assert sum(count_samples(str(p)) for p in sorted(out.glob("*.tar"))) == 6


# ---- sources ----


@pytest.fixture
def image_dir(tmp_path, tiny_image):
    d = tmp_path / "images"
    (d / "val2014").mkdir(parents=True)
    for name in ["a.jpg", "b.jpg", "c.png"]:
        (d / name).write_bytes(tiny_image(len(name), "PNG" if name.endswith("png") else "JPEG"))
    (d / "val2014" / "v.jpg").write_bytes(tiny_image(7))
    return d


def test_coco_captions_group_annotations_per_image(tmp_path, image_dir):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "gone.jpg"},
                   {"id": 4, "file_name": "c.png"}],
        "annotations": [{"image_id": i, "caption": f"cap {i} {j}"} for i, n in [(1, 5), (2, 3), (3, 2)] for j in range(n)],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    samples = coco_samples(tmp_path / "captions_val2017.json", image_dir)
    assert [(s.key, len(s.captions)) for s in samples] == [("a", 5), ("b", 3), ("gone", 2), ("c", 0)]
    summary = write_shards(samples, str(tmp_path / "out" / "val-%06d.tar"), progress=False)
    assert summary.samples == 2 and summary.skipped == {"missing_file": 1, "empty_caption": 1}
    assert [len(e.captions) for e in iter_samples(summary.shards)] == [5, 3]
    assert json.loads(dict(read_members(summary.shards[0]))["a.json"])["image_id"] == 1


def test_karpathy_splits_put_restval_in_train(tmp_path, image_dir):
    images = [
        {"filepath": "", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog."}, {"raw": "A pup."}]},
        {"filepath": "", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "B."}]},
        {"filepath": "val2014", "filename": "v.jpg", "split": "val", "sentences": [{"raw": "V1"}, {"raw": "V2"}, {"raw": "V3"}]},
        {"filepath": "val2014", "filename": "c.png", "split": "test", "sentences": [{"raw": "C"}]},  # found at the root
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    splits = karpathy_samples(tmp_path / "dataset_coco.json", image_dir)
    assert {k: [s.key for s in v] for k, v in splits.items()} == {"train": ["a", "b"], "val": ["v"], "test": ["c"]}
    assert splits["val"][0].captions == ["V1", "V2", "V3"]

    out = tmp_path / "out"
    assert shards_main(["--karpathy", str(tmp_path / "dataset_coco.json"), "--images", str(image_dir), "--out", str(out),
                        "--quiet"]) == 0
    counts = {split: sum(count_samples(str(p)) for p in out.glob(f"{split}-*.tar")) for split in ("train", "val", "test")}
    assert counts == {"train": 2, "val": 1, "test": 1}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_tables_group_captions_of_the_same_image(tmp_path, image_dir, suffix):
    rows = [("a.jpg", "first a"), ("b.jpg", "only b"), ("a.jpg", "second a"), ("gone.jpg", "x"), ("c.png", "")]
    path = tmp_path / f"table{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"img": i, "text": c, "extra": 1}) + "\n" for i, c in rows))
    else:
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
            w.writerow(["img", "text", "extra"])
            w.writerows([(i, c, 1) for i, c in rows])
    samples = table_samples(path, "img", "text", image_dir)
    assert [(s.key, s.captions) for s in samples] == [
        ("a", ["first a", "second a"]), ("b", ["only b"]), ("gone", ["x"]), ("c", [""])]
    summary = write_shards(samples, str(tmp_path / "out" / "train-%06d.tar"), progress=False)
    assert summary.samples == 2 and summary.skipped == {"missing_file": 1, "empty_caption": 1}
    with pytest.raises(ValueError, match="no column 'caption'"):
        table_samples(path, "img", "caption", image_dir)


def test_folder_source_reads_sidecar_captions(tmp_path, tiny_image):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    (d / "one.jpg").write_bytes(tiny_image(1))
    (d / "one.txt").write_text("first caption\n\nsecond caption\n")
    (d / "sub" / "two.PNG").write_bytes(tiny_image(2, "PNG"))
    (d / "sub" / "two.txt").write_text("a caption")
    (d / "three.jpg").write_bytes(tiny_image(3))  # no sidecar
    samples = folder_samples(d)
    assert [(s.key, s.captions) for s in samples] == [
        ("one", ["first caption", "", "second caption"]), ("sub/two", ["a caption"]), ("three", None)]
    out = tmp_path / "out"
    assert shards_main(["--folder", str(d), "--out", str(out), "--quiet", "--maxcount", "1"]) == 0
    got = {e.key: e.captions for e in iter_samples(str(out / "train-*.tar"))}
    assert got == {"one": ["first caption", "second caption"], "sub_two": ["a caption"]}


def test_cli_prints_a_summary_and_parallel_workers_give_the_same_bytes(tmp_path, image_dir, capsys):
    (image_dir / "a.txt").write_text("cap a")
    (image_dir / "b.txt").write_text("cap b")
    assert shards_main(["--folder", str(image_dir), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: 2 samples in 1 shards; skipped: missing_caption=2" in out
    assert shards_main(["--folder", str(image_dir), "--out", str(tmp_path / "two"), "--quiet", "--workers", "2"]) == 0
    assert (tmp_path / "one" / "train-000000.tar").read_bytes() == (tmp_path / "two" / "train-000000.tar").read_bytes()
    assert shards_main(["--coco-captions", str(tmp_path / "nope.json"), "--images", str(image_dir), "--out", "x"]) == 2
