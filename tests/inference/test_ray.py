"""Captioning on Ray (`mmcap.inference.ray_engine`, `mmcap caption --engine ray`): one local Ray
for the module (2 CPUs), a tiny model, a folder, shards and a Parquet file with bad images in
each. Captions equal the Python API's; bad images give error rows; a killed driver resumes and a
killed model worker is replaced, each image appearing exactly once in the output files."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import CAPTIONS, circle_images, tiny_config, tiny_image_bytes
from PIL import Image

from mmcap.cli import main as mmcap_main

KW = dict(max_new_tokens=4, min_new_tokens=2)
ARGS = ["--max-new-tokens", "4", "--min-new-tokens", "2", "--batch-size", "2"]
REPO = Path(__file__).resolve().parents[2]


# ---- fixtures: one local Ray, a tiny model that says words, inputs with bad images ----


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny GPT-2 captioner after a few steps on four images (untrained, it repeats BOS), saved."""
    from mmcap import Captioner

    torch.manual_seed(0)
    captioner = Captioner.from_config(tiny_config("gpt2"), captions=CAPTIONS)
    pixels, _ = captioner.preprocess(circle_images())
    tokens = captioner.tokenizer(CAPTIONS, 16)
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=3e-3)
    for _ in range(10):
        captioner(pixels, tokens["input_ids"], tokens["attention_mask"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    captioner.eval()
    path = tmp_path_factory.mktemp("model")
    captioner.save_pretrained(path)
    return captioner, path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """photos/: 11 images and broken.png; two shards (s0-s2, s3-s4; s3 corrupt); images.parquet:
    five rows (p3 corrupt). Returns the paths and {(container, key): image bytes} of the good ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcap.data.shards import Sample, update_index, write_shards

    root = tmp_path_factory.mktemp("inputs")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, image in enumerate(circle_images()):
        image.save(photos / f"circle{i}.jpg")
    for i in range(6):
        (photos / f"tiny{i}.png").write_bytes(tiny_image_bytes(i, "PNG", (30 + 5 * i, 24)))
    (photos / "sub" / "deep.jpg").write_bytes(tiny_image_bytes(7, size=(50, 40)))
    (photos / "broken.png").write_bytes(b"not an image")

    images = [tiny_image_bytes(10 + i, size=(40, 30)) for i in range(5)]
    samples = [Sample(key=f"s{i}", image=image, captions=[f"caption {i}"]) for i, image in enumerate(images)]
    write_shards([s for s in samples if s.key != "s3"], str(root / "in" / "part-%06d.tar"), maxcount=3,
                 progress=False)
    second = root / "in" / "part-000001.tar"
    with tarfile.open(second) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(second, "w") as tar:  # write_shards refuses bad images: add the corrupt one by hand
        for name, data in members + [("s3.jpg", b"\xff\xd8\xff\xe0 broken"), ("s3.txt", b"caption 3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    update_index(str(second), 2)
    good = {}
    for shard in sorted((root / "in").glob("*.tar")):
        with tarfile.open(shard) as tar:
            good.update({(str(shard), m.name[: -len(".jpg")]): tar.extractfile(m).read() for m in tar
                         if m.name.endswith(".jpg") and m.name != "s3.jpg"})

    rows = [tiny_image_bytes(20 + i, size=(36, 28)) for i in range(5)]
    rows[3] = b"corrupt"
    parquet = root / "images.parquet"
    pq.write_table(pa.table({"key": [f"p{i}" for i in range(5)], "jpg": rows}), parquet)
    good.update({(str(parquet), f"p{i}"): rows[i] for i in range(5) if i != 3})
    files = sorted(str(p) for p in photos.rglob("*.*") if p.name != "broken.png")
    return {"photos": photos, "shards": str(root / "in" / "part-{000000..000001}.tar"), "parquet": parquet,
            "files": files, "good": good}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """80 small images: enough output files (2 images each) for a kill to land mid-run."""
    folder = tmp_path_factory.mktemp("many")
    for i in range(80):
        (folder / f"im{i:03d}.png").write_bytes(tiny_image_bytes(i, "PNG", (24 + i % 9, 20)))
    return folder


def caption_bytes(captioner, data: list[bytes]) -> list[str]:
    return captioner.caption([Image.open(io.BytesIO(d)) for d in data], batch_size=2, **KW)


def read_output(out: Path) -> list[dict]:
    from mmcap.inference.ray_run import read_records

    return [r for f in sorted(out.iterdir()) if f.suffix in (".parquet", ".jsonl") for r in read_records(f)]


def ray_process_pids(name: str) -> list[int]:
    """Ray worker processes (descendants of this process: our local Ray) whose title holds `name`."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    found = []
    for pid in parents:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and name in title and ours(pid):
            found.append(pid)
    return found


# ---- without the extra ----


def test_without_ray_nothing_imports_it_and_the_command_says_to_install_the_extra(monkeypatch, tmp_path, capsys):
    import importlib

    from mmcap.inference import cli, ray_engine, ray_run

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    for module in (ray_engine, ray_run, cli):  # their module-level imports need no Ray
        importlib.reload(module)
    (tmp_path / "a.jpg").write_bytes(tiny_image_bytes(0))
    code = mmcap_main(["caption", "--engine", "ray", "--model", str(tmp_path), "--output", str(tmp_path / "out"),
                       str(tmp_path / "a.jpg")])
    assert code == 1
    assert 'pip install "mmcap[ray]"' in capsys.readouterr().err
    with pytest.raises(ImportError, match=r'mmcap\[ray\]'):
        ray_engine.require_ray()


# ---- the Python piece ----


@pytest.mark.slow
def test_caption_batches_takes_batches_as_ray_data_reads_them(ray, model, inputs):
    """Webdataset members, read_images' arrays, read_binary_files' bytes and a Parquet column, each
    captioned as the Python API captions the same images; bad images give error rows."""
    from mmcap.inference.ray_engine import CaptionBatches

    captioner, path = model
    caption = CaptionBatches(path, num_threads=1, **KW)
    good = inputs["good"]

    shards = sorted(str(p) for p in Path(inputs["parquet"]).parent.glob("in/*.tar"))
    batch = ray.data.read_webdataset(shards, decoder=None).take_batch(10)
    out = caption(batch)
    assert "jpg" not in out and "pixels" not in out and "__url__" in out
    from ray.data.block import BlockAccessor

    assert BlockAccessor.for_block(BlockAccessor.batch_to_block(out)).num_rows() == len(out["image"])  # Ray takes it
    by_key = dict(zip(out["image"], zip(out["caption"].to_pylist(), out["error"].to_pylist())))
    assert by_key.pop("s3") == (None, "unreadable_image")
    keys = sorted(by_key)
    expected = caption_bytes(captioner, [next(v for (s, k), v in good.items() if k == key) for key in keys])
    assert [by_key[k] for k in keys] == [(c, None) for c in expected] and any(expected)

    files = inputs["files"]
    batch = ray.data.read_images(files, include_paths=True).take_batch(20)
    out = caption(batch)
    captions = {"/" + p.lstrip("/"): c for p, c in zip(out["image"], out["caption"].to_pylist())}
    assert captions == dict(zip(files, captioner.caption(files, batch_size=2, **KW)))

    broken = str(inputs["photos"] / "broken.png")
    batch = ray.data.read_binary_files([files[0], broken], include_paths=True).take_batch(5)
    out = caption(batch)
    result = {Path(p).name: (c, e) for p, c, e in zip(out["image"], out["caption"].to_pylist(),
                                                        out["error"].to_pylist())}
    assert result == {"broken.png": (None, "unreadable_image"),
                      Path(files[0]).name: (captioner.caption(files[0], **KW), None)}

    batch = ray.data.read_parquet(str(inputs["parquet"])).take_batch(10)
    out = caption(batch)
    assert list(out["image"]) == [f"p{i}" for i in range(5)]
    assert out["error"].to_pylist() == [None, None, None, "unreadable_image", None]
    expected = caption_bytes(captioner, [good[(str(inputs["parquet"]), f"p{i}")] for i in (0, 1, 2, 4)])
    assert [c for c in out["caption"].to_pylist() if c is not None] == expected
    assert all(lp < 0 for lp in out["log_prob"].to_pylist() if lp is not None)


@pytest.mark.slow
def test_caption_dataset_decodes_in_cpu_tasks_apart_from_the_model_actors(ray, model, inputs, capsys):
    from mmcap.inference.ray_engine import caption_dataset

    captioner, path = model
    shards = sorted(str(p) for p in Path(inputs["parquet"]).parent.glob("in/*.tar"))
    ds = caption_dataset(ray.data.read_webdataset(shards, decoder=None), path, batch_size=2, **KW)
    ds.explain()
    plan = capsys.readouterr().out
    physical = plan[plan.index("Physical"):] if "Physical" in plan else plan
    assert "FlatMap(decode_row)" in physical and "MapBatches(CaptionBatches)" in physical
    assert "FlatMap(decode_row)->MapBatches(CaptionBatches)" not in physical  # not fused into the actors
    rows = {r["image"]: r for r in ds.take_all()}
    assert rows.pop("s3")["error"] == "unreadable_image"
    keys = sorted(rows)
    expected = caption_bytes(captioner, [next(v for (s, k), v in inputs["good"].items() if k == key) for key in keys])
    assert [rows[k]["caption"] for k in keys] == expected


# ---- the command ----


@pytest.mark.slow
def test_cli_writes_one_file_per_input_each_image_once_with_the_apis_captions(ray, model, inputs, tmp_path,
                                                                               capsys):
    captioner, path = model
    out = tmp_path / "out"
    argv = ["caption", "--engine", "ray", "--model", str(path), "--output", str(out), "--files-per-output", "5",
            *ARGS, str(inputs["photos"]), inputs["shards"], str(inputs["parquet"])]
    assert mmcap_main(argv) == 1  # three bad images
    err = capsys.readouterr().err
    assert "19 captioned, 3 failed (unreadable_image=3)" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "_mmcap_run.json", "files-000000.parquet", "files-000001.parquet", "files-000002.parquet", "images.parquet",
        "part-000000.parquet", "part-000001.parquet"]
    records = read_output(out)
    assert len(records) == 22 and len({(r.get("shard"), r["image"]) for r in records}) == 22
    errors = {r["image"]: r["error"] for r in records if "error" in r}
    assert errors == {str(inputs["photos"] / "broken.png"): "unreadable_image", "s3": "unreadable_image",
                      "p3": "unreadable_image"}
    files = [r for r in records if "shard" not in r and "caption" in r]
    assert [r["image"] for r in files] == inputs["files"]  # sorted, as given
    assert [r["caption"] for r in files] == captioner.caption(inputs["files"], batch_size=2, **KW)
    contained = sorted((r["shard"], r["image"]) for r in records if "shard" in r and "caption" in r)
    assert [r for _, r in sorted(((r["shard"], r["image"]), r["caption"]) for r in records
                                 if "shard" in r and "caption" in r)] == \
        caption_bytes(captioner, [inputs["good"][k] for k in contained])

    # another run into the same directory is refused; --resume completes the same run only
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    assert mmcap_main(argv) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert mmcap_main(argv[:-1] + ["--resume"]) == 1
    assert "differs in inputs_sha256, units" in capsys.readouterr().err
    assert mmcap_main(argv + ["--resume"]) == 1  # nothing left to do; the earlier failures still count
    err = capsys.readouterr().err
    assert "0 of 6 inputs to caption" in err and "already written: 6 files (captioned=19, unreadable_image=3)" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")} == written
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert mmcap_main(argv[:6] + [str(tmp_path / "other")] + argv[7:] + ["--resume"]) == 1
    assert "holds other files (notes.txt)" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_a_killed_driver_gives_each_image_once(ray, model, many, tmp_path, capsys):
    _, path = model
    out = tmp_path / "out"
    argv = ["caption", "--engine", "ray", "--model", str(path), "--output", str(out), "--files-per-output", "2",
            "--format", "jsonl", *ARGS[:-1], "1", str(many)]
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "mmcap.cli", *argv, "--ray-address", address], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not list(out.glob("files-*.jsonl")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {p.name: p.read_bytes() for p in out.glob("files-*.jsonl")}
    assert 0 < len(before) < 40, driver.stderr.read().decode()[-2000:]
    assert mmcap_main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{40 - len(before)} of 40 inputs to caption" in err
    assert {name: (out / name).read_bytes() for name in before} == before  # complete files stay as they were
    records = read_output(out)
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in many.iterdir())  # each exactly once


@pytest.mark.slow
def test_a_killed_model_worker_is_replaced_and_each_image_appears_once(ray, model, many, tmp_path, capsys):
    _, path = model
    out = tmp_path / "out"
    killed, files_then = [], []

    def kill_a_worker_mid_run():
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not killed:
            if list(out.glob("files-*.parquet")):
                for pid in ray_process_pids("MapBatches(CaptionBatches)"):
                    files_then.append(len(list(out.glob("files-*.parquet"))))
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_mid_run, daemon=True)
    killer.start()
    code = mmcap_main(["caption", "--engine", "ray", "--model", str(path), "--output", str(out),
                       "--files-per-output", "2", *ARGS[:-1], "1", str(many)])
    killer.join(timeout=5)
    assert killed and files_then[0] < 40  # killed mid-run
    assert code == 0, capsys.readouterr().err[-3000:]
    records = read_output(out)
    assert len(list(out.glob("files-*.parquet"))) == 40
    assert Counter(r["image"] for r in records) == Counter(str(p) for p in many.iterdir())  # each exactly once
    assert all("caption" in r for r in records)


def test_read_unit_numbers_the_rows_and_its_last_row_carries_the_count(inputs, tmp_path):
    pytest.importorskip("pyarrow")
    from mmcap.inference.ray_engine import read_unit

    def rows(kind, sources, **columns):
        unit = {"unit": 7, "kind": kind, "sources": sources, "image_column": None, "key_column": None, **columns}
        return list(read_unit(unit, image_size=64, batch_size=2, root=str(tmp_path)))

    broken = str(inputs["photos"] / "broken.png")
    files = rows("files", [inputs["files"][0], broken, inputs["files"][1]])
    assert sorted((r["index"], r["image"], r["error"]) for r in files) == [
        (0, inputs["files"][0], ""), (1, broken, "unreadable_image"), (2, inputs["files"][1], "")]
    assert [r["count"] for r in files] == [-1, -1, 3] and files[0]["pixels"].dtype.name == "uint8"
    parquet = rows("parquet", [str(inputs["parquet"])], image_column="jpg", key_column="key")
    assert [(r["index"], r["image"], r["error"], r["count"]) for r in parquet] == [
        (0, "p0", "", -1), (1, "p1", "", -1), (2, "p2", "", -1), (3, "p3", "unreadable_image", -1), (4, "p4", "", 5)]
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    (end,) = rows("shard", ["empty.tar"])  # relative to the driver's directory
    assert end["end"] and end["count"] == 0


def test_units_group_sorted_files_and_name_outputs_after_their_inputs(tmp_path):
    pytest.importorskip("pyarrow")
    from mmcap.inference.ray_run import plan_units

    for name in ("b.jpg", "a.jpg", "c.png"):
        (tmp_path / name).write_bytes(tiny_image_bytes(0))
    units = plan_units([str(tmp_path / "c.png"), str(tmp_path)], files_per_output=2)
    assert [(u.name, [Path(s).name for s in u.sources]) for u in units] == [
        ("files-000000", ["a.jpg", "b.jpg"]), ("files-000001", ["c.png"])]
    with pytest.raises(FileNotFoundError, match="matches no Parquet"):
        plan_units([str(tmp_path / "*.parquet")])


def test_lossy_precisions_draft_decode_large_jpegs_as_the_api_does(model, tmp_path):
    """Below fp32 `Captioner.caption` may decode a large JPEG at a reduced scale; the decode stage
    does the same there (and only there), so the Ray path sees the same pixels as the API."""
    pytest.importorskip("pyarrow")
    from mmcap.inference.ray_engine import decode_row, drafts, pixel_steps, read_unit

    captioner, _ = model
    size = captioner.config.image_size
    torch.manual_seed(0)
    big = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=(480, 640), mode="bilinear")[0]
    path = tmp_path / "big.jpg"
    Image.fromarray((big.permute(1, 2, 0) * 255).byte().numpy()).save(path, quality=95)
    assert not drafts("fp32") and drafts("bf16")
    _, normalize = pixel_steps(size)
    for draft in (False, True):
        (row,) = decode_row({"jpg": path.read_bytes(), "__key__": "big"}, image_size=size, draft=draft)
        unit = {"unit": 0, "kind": "files", "sources": [str(path)], "image_column": None, "key_column": None}
        (streamed,) = read_unit(unit, image_size=size, batch_size=2, root=str(tmp_path), draft=draft)
        assert (row["pixels"] == streamed["pixels"]).all()
        api = captioner.preprocess(str(path), draft=draft)[0][0]
        assert torch.equal(normalize(torch.from_numpy(row["pixels"])), api)
    assert not torch.equal(captioner.preprocess(str(path), draft=True)[0], captioner.preprocess(str(path))[0])
