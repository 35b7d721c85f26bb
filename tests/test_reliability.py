"""Reliability and security: one set of shards full of bad inputs, runs killed with SIGKILL,
checkpoints and model directories that try to run code.

Not repeated here (see the other files): each bad input decoded on its own and arbitrary bytes
(test_data), `..` member names (test_data), NaN/inf steps (test_training), an in-process resume
(test_training), a forked SIGKILL inside `write_shards` (test_shards).
"""
import csv
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import module_args, tiny_config
from PIL import Image

from mmcap import Captioner
from mmcap.cli import main as mmcap_main
from mmcap.data import CaptionDataModule, count_samples, iter_samples
from mmcap.data.samples import MAX_CAPTION_CHARS
from mmcap.data.shardlist import ends_cleanly
from mmcap.images import ImageError
from mmcap.training import CaptionModule
from mmcap.inference.cli import eval_main
from mmcap.training.cli import export_main, lightning_main

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- bad inputs, all in one set of shards ----------------------------------------------------


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    im = Image.new("RGB", (48, 24), (255, 0, 0))
    im.paste((0, 0, 255), (24, 0, 48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def odd_but_valid_images() -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes): images that need converting, and then are fine."""
    palette = Image.new("P", (40, 40))
    palette.putpalette([10, 200, 30] * 256)
    return {
        "gray": ("png", encode(Image.new("L", (40, 40), 77), "PNG")),
        "rgba": ("png", encode(Image.new("RGBA", (40, 40), (255, 0, 0, 128)), "PNG")),
        "palette": ("png", encode(palette, "PNG")),
        "cmyk": ("jpg", encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")),
        "deep": ("png", encode(Image.fromarray(np.full((40, 40), 40000, np.uint16)), "PNG")),
        "rotated": ("jpg", exif_rotated_jpeg()),
    }


def unusable_images() -> dict[str, tuple[str, bytes, str]]:
    """name -> (extension, bytes, skip reason)."""
    jpeg = encode(Image.new("RGB", (40, 40), "blue"), "JPEG")
    return {
        "corrupt": ("jpg", jpeg[: len(jpeg) // 2], "unreadable_image"),
        "empty": ("jpg", b"", "empty_file"),
        "bomb": ("png", png_header_only(50_000, 50_000), "too_large"),
    }


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


LONG_CAPTION = "word " * 20_000  # 100,000 characters
# What reading `bad_shards` must skip, by reason (one sample each).
BAD_SKIPS = {"unreadable_image": 1, "empty_file": 1, "too_large": 1, "missing_caption": 1, "empty_caption": 1,
             "non_utf8": 1, "truncated_shard": 1}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """Two shards with every kind of bad input between good samples; the second is cut off in the
    middle of a member. Returns (pattern, {usable key: its caption as read})."""
    out = tmp_path_factory.mktemp("bad_shards")
    usable, first, second = {}, [], []

    def jpeg(colour):
        return encode(Image.new("RGB", (40, 40), colour), "JPEG")

    def add(members, key, ext, image, caption):
        if image is not None:
            members.append((f"{key}.{ext}", image))
        if caption is not None:
            members.append((f"{key}.txt", caption))

    add(first, "good0", "jpg", jpeg("red"), b"a red square")
    usable["good0"] = "a red square"
    for name, (ext, data) in odd_but_valid_images().items():
        add(first, name, ext, data, f"an odd {name} image".encode())
        usable[name] = f"an odd {name} image"
    for name, (ext, data, _) in unusable_images().items():
        add(first, name, ext, data, f"an unusable {name} image".encode())
    add(first, "nocaption", "jpg", jpeg("green"), None)
    add(first, "blank", "jpg", jpeg("green"), b" \t\n  ")
    add(first, "latin1", "jpg", jpeg("green"), "un caf\xe9 cr\xe8me".encode("latin-1"))
    add(first, "long", "jpg", jpeg("white"), LONG_CAPTION.encode())
    usable["long"] = LONG_CAPTION.strip()[:MAX_CAPTION_CHARS].rsplit(" ", 1)[0]
    write_tar(out / "bad-000000.tar", first)

    noise = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
    for i, colour in enumerate(["yellow", "black"], start=1):
        add(second, f"good{i}", "jpg", jpeg(colour), f"a {colour} square".encode())
        usable[f"good{i}"] = f"a {colour} square"
    add(second, "cutoff", "jpg", noise, b"never read: the shard ends inside the image")
    write_tar(out / "bad-000001.tar", second)
    data = (out / "bad-000001.tar").read_bytes()
    (out / "bad-000001.tar").write_bytes(data[: data.index(noise) + len(noise) // 2])
    return str(out / "bad-*.tar"), usable


class RecordBatches(L.Callback):
    def __init__(self):
        self.keys, self.captions, self.pixels = [], {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += batch["keys"]
        self.captions.update(zip(batch["keys"], batch["captions"]))
        self.pixels.append(batch["pixels"])


def tiny_module(**overrides) -> CaptionModule:
    cfg = tiny_config(image_size=32)
    kw = dict(lr=1e-3, warmup_steps=1, generation={"num_beams": 1, "max_new_tokens": 5}, grid_images=0)
    return CaptionModule(**module_args(**{**cfg, **kw, **overrides}))


def test_training_runs_through_bad_inputs_and_counts_each_by_reason(bad_shards, tmp_path):
    pattern, usable = bad_shards
    torch.manual_seed(0)
    module = tiny_module(total_steps=3)
    data = CaptionDataModule(train_shards=pattern, image_size=32, batch_size=4, num_workers=0, shuffle_buffer=4,
                             max_caption_tokens=16)
    record = RecordBatches()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=[record], default_root_dir=str(tmp_path))
    trainer.fit(module, data)

    # every usable sample trained exactly once (one epoch), odd-but-valid images converted
    assert sorted(record.keys) == sorted(usable)
    assert record.captions == usable  # the 100,000-character caption cut to MAX_CAPTION_CHARS
    pixels = torch.cat(record.pixels)
    assert pixels.shape == (len(usable), 3, 32, 32) and torch.isfinite(pixels).all()
    assert trainer.global_step == 3 and module.bad_steps == 0  # 10 samples in batches of 4

    # the unusable ones are counted by reason, and those counts reach the logs
    logged = {k.removeprefix("data/skipped_"): int(v) for k, v in trainer.logged_metrics.items()
              if k.startswith("data/skipped_")}
    assert logged == BAD_SKIPS
    assert int(trainer.logged_metrics["data/skipped"]) == sum(BAD_SKIPS.values())


def test_validation_counts_unusable_samples_by_reason(bad_shards, tmp_path):
    pattern, usable = bad_shards
    torch.manual_seed(0)
    module = tiny_module(total_steps=3)
    data = CaptionDataModule(train_shards=pattern, val_shards=pattern, image_size=32, batch_size=4,
                             num_workers=0, max_caption_tokens=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    for _ in range(2):  # counted per validation run, never carried over into the next one
        metrics = trainer.validate(module, data, verbose=False)[0]
        logged = {k.removeprefix("val/skipped_"): int(v) for k, v in metrics.items() if k.startswith("val/skipped_")}
        assert logged == BAD_SKIPS
        assert int(metrics["val/skipped"]) == sum(BAD_SKIPS.values())
        assert int(metrics["val/samples"]) == len(usable)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model"
    Captioner.from_config(tiny_config(image_size=32), captions=["a red square", "an odd image"]).save_pretrained(path)
    return path


def test_eval_goes_on_through_bad_inputs_and_reports_skips_by_reason(bad_shards, saved_model, capsys):
    pattern, usable = bad_shards
    rc = eval_main(["--model", str(saved_model), "--data", pattern, "--json", "--no-meteor",
                    "--num-beams", "1", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert set(json.loads(out.strip())) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr", "METEOR"}
    summary = next(line for line in err.splitlines() if line.startswith("mmcap eval: skipped "))
    assert summary == "mmcap eval: skipped " + ", ".join(f"{k}={v}" for k, v in sorted(BAD_SKIPS.items()))
    skipped = Counter()
    assert {ex.key for ex in iter_samples(pattern, skipped=skipped)} == set(usable)  # what eval scored
    assert skipped == BAD_SKIPS


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, list[str], dict[str, str]]:
    """A folder of image files: (folder, good file names, {bad file name: reason})."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "plain.jpg").write_bytes(encode(Image.new("RGB", (40, 40), "red"), "JPEG"))
    good = ["plain.jpg"]
    for name, (ext, data) in odd_but_valid_images().items():
        (folder / f"{name}.{ext}").write_bytes(data)
        good.append(f"{name}.{ext}")
    bad = {}
    for name, (ext, data, reason) in unusable_images().items():
        (folder / f"{name}.{ext}").write_bytes(data)
        bad[f"{name}.{ext}"] = reason
    (folder / "notes.png").write_bytes(b"these are not pixels")
    bad["notes.png"] = "unreadable_image"
    return folder, sorted(good), bad


def test_caption_names_each_bad_file_and_converts_odd_ones(saved_model, image_folder):
    folder, good, bad = image_folder
    model = Captioner.from_pretrained(saved_model)
    kw = dict(num_beams=1, max_new_tokens=3)
    assert len(model.caption([str(folder / name) for name in good], **kw)) == len(good)
    for name, reason in bad.items():
        started = time.perf_counter()
        with pytest.raises(ImageError, match=rf"{name}: {reason}"):
            model.caption([str(folder / "plain.jpg"), str(folder / name)], batch_size=1, **kw)
        assert time.perf_counter() - started < 5  # the 50,000 x 50,000 header is never decoded
    with pytest.raises(ImageError, match="missing_file"):
        model.caption(str(folder / "gone.jpg"), **kw)
    # images given as bytes are named by their position in the whole list, not in their batch
    images = [(folder / name).read_bytes() for name in good] + [b"\xff\xd8\xff\xe0 not a JPEG"]
    with pytest.raises(ImageError, match=rf"^image {len(good)}: unreadable_image"):
        model.caption(images, batch_size=2, **kw)


def test_cli_caption_captions_the_good_files_and_names_the_bad_ones(saved_model, image_folder, capsys):
    folder, good, bad = image_folder
    rc = mmcap_main(["caption", "--model", str(saved_model), "--format", "jsonl", "--num-beams", "1",
                     "--max-new-tokens", "3", str(folder)])
    out, err = capsys.readouterr()
    assert rc == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(Path(r["image"]).name for r in rows if "caption" in r) == good
    assert {Path(r["image"]).name: r["error"] for r in rows if "error" in r} == bad  # one record per bad file
    errors = [line for line in err.splitlines() if line.startswith("mmcap caption: error: ")]
    assert len(errors) == len(bad)
    for name, reason in bad.items():
        assert any(f"{folder / name}: {reason}" in line for line in errors), (name, errors)


# ---- faults: SIGKILL ---------------------------------------------------------------------------


@pytest.fixture
def system_tmpdir(tmp_path):
    """A TMPDIR on another filesystem than `tmp_path` where there is one (/dev/shm): the layout of
    a cluster node, with /tmp local and the checkpoints on shared storage."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        path = shm / f"mmcap-test-{os.getpid()}-{tmp_path.name}"
    else:
        path = tmp_path / "systmp"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fit_args(train: str, run: Path, max_steps: int, every: int = 2) -> list[str]:
    """`mmcap fit` without a config file: tiny model, tiny shards, checkpoints every `every` steps."""
    return [
        "fit", "--seed_everything", "0",
        "--model.captioner.encoder.arch", "resnet18", "--model.captioner.encoder.weights", "null", "--model.captioner.encoder.freeze", "all",
        "--model.captioner.decoder.hidden_size", "32", "--model.captioner.decoder.num_layers", "2", "--model.captioner.decoder.num_heads", "2",
        "--model.captioner.decoder.max_positions", "32", "--model.captioner.decoder.dropout", "0.0", "--model.captioner.projection.max_grid", "8",
        "--model.optim.warmup_steps", "2", "--model.training.grid_images", "0",
        "--data.train_shards", train, "--data.image_size", "32", "--data.batch_size", "2",
        "--data.max_caption_tokens", "16", "--data.num_workers", "0", "--data.shuffle_buffer", "4",
        "--data.resampled", "true", "--data.samples_per_epoch", "8",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", str(max_steps),
        "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run),
        "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                        "init_args": {"save_dir": str(run), "name": "csv"}}),
        "--checkpoint.dirpath", str(run / "checkpoints"), "--checkpoint.every_n_train_steps", str(every),
        "--checkpoint.save_top_k", "0", "--checkpoint.monitor", "null",
    ]


def run_until_killed(cmd: list[str], env: dict, ready, log: Path, timeout: float = 240) -> subprocess.Popen:
    """Start `cmd` in its own process group; SIGKILL the whole group (workers too, as on a
    pre-empted node) as soon as `ready()` is true."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"{cmd[3]} ended (rc {proc.returncode}) before it could be killed:\n"
                                     + log.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd[3]} never reached the point to kill it:\n" + log.read_text()[-3000:])
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    try:
        return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(directory)}
    except FileNotFoundError:
        return {}


def is_complete(checkpoint: Path) -> bool:
    try:  # mmap: reads the zip directory and the small pickle, not the tensors
        torch.load(checkpoint, weights_only=True, mmap=True, map_location="cpu")
    except Exception:
        return False
    return True


def latest_csv_steps(run: Path) -> list[int]:
    """Steps at which the latest run in `run` logged a training loss (CSVLogger)."""
    latest = max((run / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(latest / "metrics.csv") as f:
        return sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})


@pytest.mark.slow
def test_sigkill_during_fit_then_resume_from_last(make_caption_shards, tmp_path, system_tmpdir):
    train, _ = make_caption_shards(n_shards=2, per_shard=4)
    run, straight = tmp_path / "run", tmp_path / "straight"
    ckpts = run / "checkpoints"
    env = {**os.environ, "TMPDIR": str(system_tmpdir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mmcap.cli", *fit_args(train, run, max_steps=12)]

    # Kill the run as soon as the checkpoint directory changes after a first complete checkpoint:
    # that is, while the next checkpoint is being written.
    first: dict = {}

    def next_save_started() -> bool:
        if not first:
            if is_complete(ckpts / "last.ckpt"):
                first.update(snapshot(ckpts))
            return False
        return snapshot(ckpts) != first

    proc = run_until_killed(cmd, env, next_save_started, tmp_path / "fit.log")
    assert proc.returncode == -signal.SIGKILL

    # Whatever the moment, every checkpoint under a final name is complete and loads as plain data.
    finals = sorted(ckpts.glob("*.ckpt"))
    assert [p.name for p in finals] == ["last.ckpt"]
    saved_step = torch.load(finals[0], weights_only=True, map_location="cpu")["global_step"]
    assert saved_step >= 2 and saved_step % 2 == 0
    # and no killed save leaves a big file in the system temp directory (it is often a RAM disk)
    assert not [p for p in system_tmpdir.rglob("*") if p.is_file() and p.stat().st_size > 2**20]

    # Resume: goes on from the saved step and ends where an uninterrupted run ends. (A killed save
    # of a best-score checkpoint, whose name never recurs, is planted too: it must go.)
    (ckpts / "epoch=0-step=4-val-CIDEr=0.1000.ckpt.tmp").write_bytes(b"PK\x03\x04 half written")
    assert lightning_main([*fit_args(train, run, max_steps=12), "--ckpt_path", "last"]) == 0
    assert lightning_main(fit_args(train, straight, max_steps=12)) == 0
    steps = latest_csv_steps(run)
    assert steps[0] == saved_step and steps[-1] == 11
    resumed = torch.load(ckpts / "last.ckpt", weights_only=True, map_location="cpu")
    reference = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert resumed["global_step"] == reference["global_step"] == 12
    progress = "epoch_loop.batch_progress"
    assert resumed["loops"]["fit_loop"][progress] == reference["loops"]["fit_loop"][progress]
    adam_steps = [{int(s["step"]) for s in ck["optimizer_states"][0]["state"].values()} for ck in (resumed, reference)]
    assert adam_steps[0] == adam_steps[1] == {12}
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # a killed save's leftover is gone too


@pytest.mark.slow
def test_sigkill_during_mmcap_shards_leaves_only_complete_shards(tmp_path):
    source, out = tmp_path / "folder", tmp_path / "shards"
    source.mkdir()
    n, per_shard = 240, 10
    gradient = np.linspace(0, 255, 320, dtype=np.uint8)
    for i in range(n):
        pixels = np.stack([np.roll(gradient, i)[None, :].repeat(320, 0)] * 3, axis=-1)
        Image.fromarray(pixels).save(source / f"img{i:04d}.jpg", quality=90)
        (source / f"img{i:04d}.txt").write_text(f"picture number {i}\nanother caption of {i}\n")
    cmd = [sys.executable, "-m", "mmcap.cli", "shards", "--folder", str(source), "--out", str(out),
           "--maxcount", str(per_shard), "--resize-max", "64", "--workers", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = run_until_killed(cmd, env, lambda: (out / "train-000001.tar").exists(), tmp_path / "shards.log")
    assert proc.returncode == -signal.SIGKILL
    written = sorted(out.glob("*.tar"))
    assert 2 <= len(written) < n // per_shard  # killed mid-way
    index = json.loads((out / "shards.json").read_text())["shards"]
    for shard in written:  # complete and readable; the index may lag one shard behind, never lie
        assert ends_cleanly(str(shard))
        with tarfile.open(shard) as tar:
            assert len(tar.getmembers()) == 3 * per_shard  # jpg + txt + json per sample
        assert count_samples(str(shard)) == per_shard
        assert index.get(shard.name, {"bytes": shard.stat().st_size})["bytes"] == shard.stat().st_size

    rerun = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    complete_set = [f"train-{i:06d}.tar" for i in range(n // per_shard)]
    assert sorted(p.name for p in out.iterdir()) == ["shards.json", *complete_set]  # no .tmp left
    skipped = Counter()
    samples = list(iter_samples(str(out / "train-*.tar"), skipped=skipped))
    assert not skipped
    assert sorted(ex.key for ex in samples) == [f"img{i:04d}" for i in range(n)]
    assert sum(count_samples(str(p)) for p in out.glob("*.tar")) == n


# ---- security: files that try to run code ------------------------------------------------------


class Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_model_directory_asking_for_remote_code_runs_none(saved_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                   "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((model / "config.json").read_text())
    config["resolved"]["decoder"]["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    remote = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    for asks in ({"auto_map": remote}, {"auto_map": remote, "tokenizer_class": "EvilTokenizer"}):
        (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, **asks}))
        try:
            Captioner.from_pretrained(model)
        except ValueError as e:  # refusing is fine, as long as it says where
            assert str(model) in str(e)
        assert not marker.exists()


@pytest.fixture
def planted_checkpoint(make_caption_shards, tmp_path, monkeypatch):
    """A real `mmcap fit` last.ckpt with a pickle payload added. The environment turns torch's
    default back to full unpickling (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, the switch torch 2.6 gave
    users of old checkpoints): mmcap must never depend on torch's default."""
    train, _ = make_caption_shards(n_shards=1, per_shard=4)
    run = tmp_path / "run"
    assert lightning_main(fit_args(train, run, max_steps=1, every=1)) == 0
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["mmcap"]["note"] = Payload(marker)
    torch.save(checkpoint, last)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return train, run, last, marker


def test_checkpoints_with_pickled_code_are_refused_everywhere(planted_checkpoint, tmp_path, capsys):
    train, run, last, marker = planted_checkpoint

    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        CaptionModule.load_from_checkpoint(last)
    assert not marker.exists()

    capsys.readouterr()
    assert export_main(["--ckpt", str(last), "--out", str(tmp_path / "exported")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmcap export: error: ") and str(last) in err
    assert not marker.exists() and not (tmp_path / "exported").exists()

    for ckpt_path in ("last", str(last)):  # resume, by name and by path
        assert lightning_main([*fit_args(train, run, max_steps=2, every=1), "--ckpt_path", ckpt_path]) == 1
        assert "mmcap: error: " in capsys.readouterr().err
        assert not marker.exists()
