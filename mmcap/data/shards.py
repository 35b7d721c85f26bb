"""Writing captioned images into webdataset shards.

A shard is a plain tar file. Every sample is a handful of members sharing one key:

    KEY.jpg | KEY.jpeg | KEY.png | KEY.webp   the encoded image
    KEY.txt                                   one caption (the first), for tools that read only .txt
    KEY.json                                  {"captions": [...], ...source metadata}

Shards made by img2dataset (jpg + txt + json with url, width, status, ...) follow the same
convention and are read as they are. Each shard is written under a temporary name and renamed
when complete, so an interrupted run never leaves a partial shard under a final name; running it
again rewrites the whole set. `DIR/shards.json` records how many samples each shard holds, which
lets the reader plan epochs across ranks without scanning the tars.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mmcap.images import ImageError, open_image

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
FEATURE_MEMBER = "feat.npy"  # a precomputed encoder grid (`mmcap features`) in place of the image
INDEX_NAME = "shards.json"
INDEX_FORMAT = "mmcap-shards/1"
TAR_MTIME = 0  # fixed member times make shards byte-for-byte reproducible
MAX_KEY_CHARS = 64  # ustar names hold 100 characters: key + uniqueness suffix + extension fit
JPEG_QUALITY = 95
# PIL format name -> member extension for images copied byte for byte; others are re-encoded as PNG.
COPY_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: camera JPEGs with extra frames


@dataclass
class Sample:
    """One image and its captions, before it goes into a shard.

    `captions=None` means the source had no caption for the image at all (counted as
    `missing_caption`); a list with only blank strings is counted as `empty_caption`.
    """

    key: str
    image: Union[str, Path, bytes]
    captions: Optional[list[str]]
    meta: dict = field(default_factory=dict)  # extra JSON fields: source file name, ids, ...


@dataclass
class WriteSummary:
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.samples} samples in {len(self.shards)} shards; skipped: {skipped}"

    def to_dict(self) -> dict:
        return {"samples": self.samples, "shards": list(self.shards), "skipped": dict(self.skipped)}


def clean_caption(text: str) -> str:
    """One line, single spaces, no surrounding blanks."""
    return " ".join(str(text).split())


def sanitize_key(text: str) -> str:
    """A webdataset key: letters, digits, `_` and `-` only (no dots, no slashes), short."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return key[:MAX_KEY_CHARS] or "sample"


class UniqueKeys:
    """Hands out sanitized keys, appending `_2`, `_3`, ... to repeats."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, text: str) -> str:
        base = key = sanitize_key(text)
        n = 1
        while key in self.used:
            n += 1
            key = f"{base}_{n}"
        self.used.add(key)
        return key


def encode_sample(sample: Sample, resize_max: Optional[int] = None) -> Union[dict, str]:
    """The tar members of one sample (without its key), or the reason it cannot be written.

    Images are checked by decoding them fully, so the reader never meets a file the writer
    accepted as good. They are copied byte for byte unless `resize_max` asks for a smaller
    longest side (then re-encoded as JPEG) or the format is not one shards carry (then PNG).
    """
    if sample.captions is None:
        return "missing_caption"
    captions = [c for c in (clean_caption(c) for c in sample.captions if isinstance(c, str)) if c]
    if not captions:
        return "empty_caption"
    name = str(sample.image) if not isinstance(sample.image, bytes) else sample.key
    try:
        data = sample.image if isinstance(sample.image, bytes) else Path(sample.image).read_bytes()
    except FileNotFoundError:
        return "missing_file"
    except OSError:
        return "unreadable_file"
    try:
        image = open_image(data, name)
        fmt = Image.open(io.BytesIO(data)).format
    except ImageError as e:
        return e.reason
    ext = COPY_FORMATS.get(fmt)
    if resize_max is not None and max(image.size) > resize_max:
        image.thumbnail((resize_max, resize_max), Image.Resampling.BICUBIC)
        data, ext = _encode(image, "JPEG", quality=JPEG_QUALITY), "jpg"
    elif ext is None:  # BMP, GIF, TIFF: lossless re-encode into a format shards carry
        data, ext = _encode(image, "PNG"), "png"
    meta = {**sample.meta, "captions": captions}
    return {ext: data, "txt": captions[0].encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def _encode_job(job: tuple[Sample, Optional[int]]) -> tuple[str, Union[dict, str]]:
    sample, resize_max = job
    return sample.key, encode_sample(sample, resize_max)


def write_shards(
    samples: Iterable[Sample],
    out_pattern: str,
    maxcount: int = 1000,
    maxsize: Optional[int] = None,
    resize_max: Optional[int] = None,
    *,
    workers: int = 1,
    progress: bool = True,
) -> WriteSummary:
    """Write `samples` into shards named `out_pattern % index` (e.g. `out/train-%06d.tar`).

    A shard closes after `maxcount` samples or before it would exceed `maxsize` bytes. With
    `workers > 1` images are checked and encoded in a process pool; the output is identical.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    total = len(samples) if hasattr(samples, "__len__") else None
    jobs = ((s, resize_max) for s in samples)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_encode_job, jobs, chunksize=8) if pool else map(_encode_job, jobs)
        return write_member_shards(results, out_pattern, maxcount, maxsize, progress=progress, total=total)
    finally:
        if pool:
            pool.terminate()


def write_member_shards(
    items: Iterable[tuple[str, Union[dict, str]]],
    out_pattern: str,
    maxcount: int = 1000,
    maxsize: Optional[int] = None,
    *,
    progress: bool = True,
    total: Optional[int] = None,
) -> WriteSummary:
    """Write ready-made samples, `(key, {extension: bytes})` or `(key, skip reason)`, into shards
    named `out_pattern % index`; each shard appears under its final name only when complete."""
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    Path(out_pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    summary = WriteSummary()
    keys = UniqueKeys()
    shard: Optional[ShardFile] = None
    try:
        for key, members in tqdm(items, total=total, unit="sample", disable=not progress, desc="shards"):
            if isinstance(members, str):
                summary.skipped[members] += 1
                log.info("skipped %s: %s", key, members)
                continue
            size = sum(_tar_size(len(v)) for v in members.values())
            if shard is not None and (shard.count >= maxcount or (maxsize and shard.size + size > maxsize)):
                summary.shards.append(shard.close())
                shard = None
            if shard is None:
                shard = ShardFile(out_pattern % len(summary.shards))
            shard.write({"__key__": keys(key), **members}, size)
            summary.samples += 1
        if shard is not None:
            summary.shards.append(shard.close())
    finally:
        if shard is not None and not shard.closed:
            shard.abort()
    _warn_about_leftovers(out_pattern, len(summary.shards))
    return summary


def _tar_size(n: int) -> int:
    return 512 + (n + 511) // 512 * 512


class ShardFile:
    """A tar written under `NAME.tmp`, renamed to `NAME` only once complete."""

    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".tmp"
        self.stream = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.stream, encoder=False, mtime=TAR_MTIME)
        self.count = self.size = 0
        self.closed = False

    def write(self, members: dict, size: int = 0) -> None:
        self.tar.write(members)
        self.count += 1
        self.size += size

    def close(self) -> str:
        self.tar.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self.tmp, self.path)
        self.closed = True
        update_index(self.path, self.count)
        return self.path

    def abort(self) -> None:
        try:
            self.tar.close()
        finally:
            self.stream.close()
        Path(self.tmp).unlink(missing_ok=True)
        self.closed = True


def _warn_about_leftovers(out_pattern: str, n_shards: int) -> None:
    i = n_shards
    while os.path.exists(out_pattern % i) or os.path.exists(out_pattern % i + ".tmp"):
        Path(out_pattern % i + ".tmp").unlink(missing_ok=True)
        if os.path.exists(out_pattern % i):
            log.warning("%s is left over from an earlier run and does not belong to this set", out_pattern % i)
        i += 1


# ---- the per-directory index of sample counts ----


def update_index(shard_path: str, samples: int) -> None:
    """Record `samples` (and the file size, to detect stale entries) in the directory's index."""
    path = Path(shard_path)
    index_path = path.parent / INDEX_NAME
    index = _load_index(index_path)
    index[path.name] = {"samples": samples, "bytes": path.stat().st_size}
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": INDEX_FORMAT, "shards": dict(sorted(index.items()))}, indent=1))
    os.replace(tmp, index_path)


def _load_index(index_path: Path) -> dict:
    try:
        data = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        return {}
    return dict(data.get("shards") or {})


def indexed_count(shard_path: str) -> Optional[int]:
    """Samples in a local shard per its directory's index, or None if unknown or stale."""
    path = Path(shard_path)
    entry = _load_index(path.parent / INDEX_NAME).get(path.name)
    try:
        if entry and entry["bytes"] == path.stat().st_size:
            return int(entry["samples"])
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return None


def read_members(shard_path: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of a tar in order: for tests and inspection, never extracts."""
    with tarfile.open(shard_path) as tar:
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
