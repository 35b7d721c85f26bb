"""Captioning collections: `Captioner.caption_stream` and `mmcap caption` with files, folders and
shards; outputs (JSON Lines, COCO, shards), resuming after a kill, bad images."""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import CAPTIONS, tiny_image_bytes

from mmcap.accel.kernels import kernels
from mmcap.inference.writers import coco_image_id, output_shard_name
from mmcap.cli import main as mmcap_main
from mmcap.data.shards import Sample, update_index, write_shards
from mmcap.data.image_stream import plan_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(max_new_tokens=4, min_new_tokens=2)  # a few real tokens per caption
ARGS = ["--max-new-tokens", "4", "--min-new-tokens", "2", "--batch-size", "2"]


@pytest.fixture
def folder(tmp_path, image_files) -> Path:
    """Five images (one in a subfolder), one unreadable file and a text file that is ignored."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for p in image_files:
        (root / p.name).write_bytes(p.read_bytes())
    (root / "sub" / "deep.jpg").write_bytes(tiny_image_bytes(7, size=(50, 40)))
    (root / "broken.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.fixture
def shards(tmp_path) -> str:
    """Two shards (3 + 2 samples); sample s3's image is corrupt."""
    images = [tiny_image_bytes(i, size=(40, 30)) for i in range(5)]
    images[3] = b"\xff\xd8\xff\xe0 broken"
    samples = [Sample(key=f"s{i}", image=image, captions=[f"caption {i}"]) for i, image in enumerate(images)]
    write_shards([s for s in samples if s.key != "s3"], str(tmp_path / "in" / "part-%06d.tar"), maxcount=3,
                 progress=False)
    # write_shards refuses bad images: add the corrupt one to the second shard by hand
    with tarfile.open(tmp_path / "in" / "part-000001.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(tmp_path / "in" / "part-000001.tar", "w") as tar:
        for name, data in members + [("s3.jpg", images[3]), ("s3.txt", b"caption 3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    update_index(str(tmp_path / "in" / "part-000001.tar"), 2)
    return str(tmp_path / "in" / "part-{000000..000001}.tar")


@pytest.fixture
def saved(wordy, tmp_path) -> Path:
    wordy.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def good_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.*") if p.suffix in (".jpg", ".png") and p.name != "broken.png")


@pytest.mark.parametrize("workers,precision,refill", [(0, "fp32", False), (0, "fp32", True), (2, "fp32", True),
                                                    (2, "bf16", True)])
def test_stream_equals_caption_on_the_same_images(wordy, image_files, workers, precision, refill):
    """Batch by batch, the very numbers of `caption`; with slot refill (rows at their own positions,
    in mmcap's kernels) the same captions, log-probs to float rounding."""
    paths = [str(p) for p in image_files]
    kw = dict(batch_size=2, precision=precision, num_beams=2, **KW)
    stream = wordy.caption_stream(paths, num_workers=workers, refill=refill, **kw)
    assert stream.refilling == (refill and kernels() is not None)
    results = list(stream)
    assert [r["image"] for r in results] == paths  # files come out in the order given
    captions, scores = wordy.caption(paths, return_scores=True, **kw)
    assert [r["caption"] for r in results] == captions and all(captions)
    if stream.refilling:
        torch.testing.assert_close(torch.tensor([r["log_prob"] for r in results]), scores, rtol=1e-5, atol=1e-5)
    else:
        assert [r["log_prob"] for r in results] == scores.tolist()


def test_stream_reads_folders_and_shards_and_reports_bad_images(wordy, folder, shards):
    stream = wordy.caption_stream([str(folder), shards, str(folder / "gone.jpg")], batch_size=2, num_workers=2,
                                      **KW)
    assert stream.total == 6 + 1 + 5
    results = list(stream)
    errors = {r["image"]: r["error"] for r in results if "error" in r}
    assert errors == {str(folder / "broken.png"): "unreadable_image", str(folder / "gone.jpg"): "missing_file",
                      "s3": "unreadable_image"}
    captioned = [r for r in results if "caption" in r]
    files = [r["image"] for r in captioned if "shard" not in r]
    assert files == good_files(folder)
    assert wordy.caption(files, batch_size=2, **KW) == [r["caption"] for r in captioned if "shard" not in r]
    by_shard = {(r["shard"].rsplit("/", 1)[1], r["image"]) for r in results if "shard" in r}
    assert by_shard == {("part-000000.tar", "s0"), ("part-000000.tar", "s1"), ("part-000000.tar", "s2"),
                        ("part-000001.tar", "s4"), ("part-000001.tar", "s3")}


def test_plan_inputs_tells_files_from_shards(folder, shards, tmp_path):
    planned = plan_inputs([str(folder / "img0.jpg"), shards, str(folder / "sub")])
    assert planned.files == [str(folder / "img0.jpg"), str(folder / "sub" / "deep.jpg")]
    assert [Path(u).name for u in planned.shards] == ["part-000000.tar", "part-000001.tar"]
    assert plan_inputs("pipe:cat x.tar").shards == ["pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match="nothing.tar"):
        plan_inputs(str(tmp_path / "nothing.tar"))


def test_cli_stdout_formats_and_exit_status(saved, folder, capsys):
    two = [str(folder / "img0.jpg"), str(folder / "img1.png")]
    assert mmcap_main(["caption", "--model", str(saved), *ARGS, *two]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == two
    assert "mmcap caption: 2 captioned, 0 failed" in err
    assert mmcap_main(["caption", "--model", str(saved), "--format", "jsonl", *ARGS, str(folder)]) == 1
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r for r in rows if "error" in r] == [{"image": str(folder / "broken.png"), "error": "unreadable_image"}]
    assert f"mmcap caption: error: {folder / 'broken.png'}: unreadable_image" in err
    assert "5 captioned, 1 failed (unreadable_image=1)" in err


def test_cli_jsonl_resume_after_a_kill_completes_each_image_once(saved, folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert mmcap_main(["caption", "--model", str(saved), "--output", str(out), *ARGS, str(folder)]) == 1
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    assert len(lines) == 6 and json.loads(lines[0])["log_prob"] < 0
    # a kill mid-write: two complete records and half of the third
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    capsys.readouterr()
    assert mmcap_main(["caption", "--model", str(saved), "--output", str(out), *ARGS, str(folder)]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert mmcap_main(["caption", "--model", str(saved), "--output", str(out), "--resume", *ARGS, str(folder)]) == 1
    err = capsys.readouterr().err
    assert "4 captioned, 0 failed" in err and "already written: captioned=1, unreadable_image=1" in err
    assert sorted(out.read_text().splitlines()) == sorted(full.splitlines())  # each image exactly once
    # nothing left to do: the file stays as it is, and the status still reports the earlier failure
    assert mmcap_main(["caption", "--model", str(saved), "--output", str(out), "--resume", *ARGS, str(folder)]) == 1
    assert sorted(out.read_text().splitlines()) == sorted(full.splitlines())


def test_cli_coco_results_written_at_the_end(saved, tmp_path, image_files):
    coco = tmp_path / "coco"
    coco.mkdir()
    for i, p in enumerate(image_files[:2]):
        (coco / f"COCO_val2014_{397133 + i:012d}.jpg").write_bytes(p.read_bytes())
    out = tmp_path / "results.json"
    assert mmcap_main(["caption", "--model", str(saved), "--output", str(out), "--format", "coco", *ARGS,
                       str(coco)]) == 0
    results = json.loads(out.read_text())
    assert [r["image_id"] for r in results] == [397133, 397134]
    progress = [json.loads(line) for line in (tmp_path / "results.json.progress.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in results] == [r["caption"] for r in progress]
    assert coco_image_id("photos/cat.jpg") == "photos/cat.jpg" and coco_image_id("000000000139.jpg") == 139


def test_cli_shards_output_keeps_every_member_and_resumes_by_shard(saved, shards, tmp_path, capsys):
    out = tmp_path / "recaptioned"
    args = ["caption", "--model", str(saved), "--output", str(out), "--format", "shards", *ARGS, shards]
    assert mmcap_main(args) == 1  # s3 cannot be read
    with tarfile.open(out / "part-000001.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert set(members) == {"s4.jpg", "s4.txt", "s4.json", "s4.mmcap.json", "s3.jpg", "s3.txt", "s3.mmcap.json"}
    assert json.loads(members["s3.mmcap.json"])["error"] == "unreadable_image"
    assert members["s4.jpg"] == tiny_image_bytes(4, size=(40, 30))
    assert set(json.loads(members["s4.mmcap.json"])) == {"caption", "log_prob"}
    assert json.loads((out / "shards.json").read_text())["shards"]["part-000000.tar"]["samples"] == 3
    # resume: the finished output shards are kept, the missing one is written again
    (out / "part-000000.tar").unlink()
    before = (out / "part-000001.tar").stat().st_mtime_ns
    capsys.readouterr()
    assert mmcap_main([*args, "--resume"]) == 0
    assert "3 captioned, 0 failed" in capsys.readouterr().err
    assert (out / "part-000001.tar").stat().st_mtime_ns == before
    with tarfile.open(out / "part-000000.tar") as tar:
        assert Counter(m.name.split(".", 1)[1] for m in tar)["mmcap.json"] == 3
    assert output_shard_name("pipe:aws s3 cp s3://b/cc3m/00012.tar -", 0) == "00012.tar"


def test_cli_refuses_options_that_do_not_fit(saved, folder, capsys):
    with pytest.raises(SystemExit):
        mmcap_main(["caption", "--model", str(saved), "--format", "coco", str(folder)])
    with pytest.raises(SystemExit):
        mmcap_main(["caption", "--model", str(saved), "--resume", str(folder)])
    assert mmcap_main(["caption", "--model", str(saved), "--format", "shards", "--output", "x", str(folder)]) == 1
    assert "re-captions shards" in capsys.readouterr().err
