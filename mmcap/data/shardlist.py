"""Shard lists: expanding patterns, checking local shards up front, counting samples.

Patterns follow webdataset: brace ranges (`train-{000000..000007}.tar`), several patterns
joined by `::` or given as a list, URLs and `pipe:` commands passed through as they are. mmcap
adds globs for local paths (`data/demo/train-*.tar`). Whatever matches nothing, and any local
shard that cannot be opened as a tar, is an error at once, naming the culprit, instead of an
empty epoch or a worker dying later.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from typing import Iterable, Optional, Sequence, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
from webdataset import gopen
from webdataset.tariterators import base_plus_ext

from mmcap.data.shards import FEATURE_MEMBER, IMAGE_MEMBERS, indexed_count

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CAPTION_MEMBERS = ("txt", "json")
SAMPLE_MEMBERS = frozenset(IMAGE_MEMBERS + CAPTION_MEMBERS + (FEATURE_MEMBER,))  # everything else in a shard is ignored
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar iterator skips

ShardSpec = Union[str, Sequence[str]]


def is_url(url: str) -> bool:
    """Anything webdataset opens itself: http(s)://, s3://, pipe:, ... (not file:// or paths)."""
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter is a Windows drive


def local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file:") else os.path.expanduser(url)


def resolve_shards(spec: ShardSpec) -> list[str]:
    """Expand `spec` into a list of shard URLs/paths, failing on anything that matches nothing."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise FileNotFoundError("empty shard list")
    urls: list[str] = []
    for pattern in patterns:
        for part in str(pattern).split("::"):
            for item in braceexpand.braceexpand(part):
                urls += _expand_one(item, pattern)
    for url in urls:
        if not is_url(url):
            check_shard(local_path(url))
    return urls


def _expand_one(item: str, pattern: str) -> list[str]:
    if is_url(item):
        return [item]
    path = local_path(item)
    if glob.has_magic(path):
        matches = sorted(p for p in glob.glob(path) if p.endswith(TAR_SUFFIXES) and os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"shard pattern {pattern!r} matches no .tar files")
        return matches
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"shard {path!r} (from {pattern!r}) is a directory; give a pattern like {path}/train-*.tar")
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard {path!r} (from {pattern!r}) does not exist")
    return [item]


def check_shard(path: str) -> None:
    """Open a local shard and read its first header: fails now rather than in a worker later."""
    try:
        with tarfile.open(path) as tar:
            tar.next()
    except tarfile.TarError as e:
        raise ValueError(f"shard {path!r} is not a readable tar file ({e})") from None
    except OSError as e:
        raise OSError(f"shard {path!r} cannot be opened ({e.strerror or e})") from None


def wanted_member(name: str, extensions: Iterable[str] = SAMPLE_MEMBERS) -> bool:
    """Is this tar member one the reader loads? (Its extension, as webdataset splits names.)"""
    _, ext = base_plus_ext(name)
    return ext is not None and ext.lower() in extensions


def count_samples(url: str) -> int:
    """Samples in one shard, as the reader will group them: from `shards.json` when it is
    current, else by reading the tar headers (fast for local files; remote ones stream)."""
    if not is_url(url):
        count = indexed_count(local_path(url))
        if count is not None:
            return count
    keys = _member_keys(url)
    count, last = 0, None
    for key in keys:
        if key != last:
            count, last = count + 1, key
    return count


def _member_keys(url: str):
    """Keys of the members the reader keeps, in tar order; mirrors webdataset's tar iterator."""
    if is_url(url) or not url.endswith(".tar"):
        stream = gopen.gopen(url if is_url(url) else local_path(url))
        tar = tarfile.open(fileobj=stream, mode="r|*")
    else:
        tar = tarfile.open(local_path(url), mode="r:*")  # random access: skips data by seeking
    try:
        for info in tar:
            name = info.name
            if not info.isreg() or _META_MEMBER.match(name) or (name.startswith("__") and name.endswith("__")):
                continue
            key, ext = base_plus_ext(name)
            if key is not None and ext.lower() in SAMPLE_MEMBERS:
                yield key
    except (tarfile.TarError, OSError, EOFError) as e:  # a damaged shard: count what is there
        log.warning("counting %s stopped early: %s", url, e)
    finally:
        tar.close()


def shard_counts(urls: Sequence[str]) -> list[int]:
    counts = [count_samples(u) for u in urls]
    log.debug("%d samples in %d shards", sum(counts), len(urls))
    return counts


def ends_cleanly(url: str) -> Optional[bool]:
    """Does a local plain tar end with the two zero blocks of a complete archive? (None: unknown.)

    A tar cut exactly between two members reads without any error; this catches it.
    """
    if is_url(url) or not url.endswith(".tar"):
        return None
    try:
        with open(local_path(url), "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 1024:
                return False
            f.seek(-1024, os.SEEK_END)
            return f.read(1024).count(0) == 1024
    except OSError:
        return None
