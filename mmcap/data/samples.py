"""One sample: raw webdataset members in, a usable `Example` (or a counted `Skip`) out.

Pure per-sample functions (`read_captions`, `decode_sample`, `to_item`), the batch `Collate`,
the `.npy` codec of precomputed feature grids, and `read_shards`, which turns shards into raw
samples while counting shard errors by reason and never sleeping on them. The streams that
feed training and evaluation (`streams.py`) are chains of these.

Skip reasons: missing_image, missing_caption, empty_caption, non_utf8, bad_json, empty_file,
unreadable_image, too_large (bytes or pixels), bad_features; shard-level: truncated_shard, unreadable_shard,
unopenable_shard, duplicate_member, read_error.
"""
from __future__ import annotations

import io
import json
import logging
import random
import tarfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mmcap.images import ImageError, open_image
from mmcap.data.shardlist import SAMPLE_MEMBERS, ends_cleanly, wanted_member
from mmcap.data.shards import FEATURE_MEMBER, IMAGE_MEMBERS, clean_caption

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 500  # longer captions are cut at a word boundary
MAX_IMAGE_BYTES = 32 * 2**20
LOGGED_SKIPS = 10  # per reason and worker; the rest are only counted

# `tokenizer(captions, max_tokens)`, also called with `prompts=` for a batch with prompts
Tokenizer = Callable[[list[str], int], dict]


# ---- one sample ----


class Skip(Exception):
    """A sample that cannot be used; `reason` is the tag it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass
class Example:
    key: str
    image: Optional[Image.Image]  # RGB, upright; None for a features sample
    captions: list[str]  # all references, in their stored order
    features: Optional[torch.Tensor] = None  # a precomputed encoder grid [C, h, w] (`mmcap.training.features`)
    prompt: Optional[str] = None  # text the captions continue (the `json` member's `prompt`)


def truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def read_captions(raw: dict, max_chars: int = MAX_CAPTION_CHARS) -> list[str]:
    """Captions of a raw sample: `json` `captions` list or `caption` string, else `txt`."""
    captions, failure = None, None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except UnicodeDecodeError:
            failure = "non_utf8"
        except (ValueError, RecursionError):
            failure = "bad_json"
        else:
            if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
                captions = [c for c in meta["captions"] if isinstance(c, str)]
            elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                captions = [meta["caption"]]
    if captions is None and "txt" in raw:
        try:
            captions = [bytes(raw["txt"]).decode("utf-8-sig")]
        except UnicodeDecodeError:
            failure = "non_utf8"
    if captions is None:
        raise Skip(failure or "missing_caption")
    # Lone surrogates (valid in JSON strings) would break tokenizers later.
    captions = [truncate(clean_caption(c.encode("utf-8", "replace").decode()), max_chars) for c in captions]
    captions = [c for c in captions if c]
    if not captions:
        raise Skip("empty_caption")
    return captions


def read_prompt(raw: dict, max_chars: int = MAX_CAPTION_CHARS) -> Optional[str]:
    """The `prompt` string of a raw sample's `json` member, if it has a non-blank one."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else None
    except (ValueError, RecursionError):  # read_captions has counted it, or the txt caption serves
        return None
    prompt = meta.get("prompt") if isinstance(meta, dict) else None
    if not isinstance(prompt, str):
        return None
    return truncate(clean_caption(prompt.encode("utf-8", "replace").decode()), max_chars) or None


def decode_sample(
    raw: dict,
    *,
    min_image_size: Optional[int] = None,
    max_caption_chars: int = MAX_CAPTION_CHARS,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> Example:
    """Image (or precomputed features) and captions of a raw webdataset sample (member bytes by
    extension), or `Skip`.

    Captions are checked first: they are cheap and rule out a sample before its image is decoded.
    """
    key = str(raw.get("__key__", "?"))
    if FEATURE_MEMBER in raw:
        captions = read_captions(raw, max_caption_chars)
        try:
            return Example(key, None, captions, features_from_bytes(bytes(raw[FEATURE_MEMBER]), key),
                           read_prompt(raw, max_caption_chars))
        except ValueError as e:
            raise Skip("bad_features", str(e)) from None
    ext = next((e for e in IMAGE_MEMBERS if e in raw), None)
    if ext is None:
        raise Skip("missing_image")
    captions = read_captions(raw, max_caption_chars)
    data = bytes(raw[ext])
    if len(data) > max_image_bytes:
        raise Skip("too_large", f"{len(data)} bytes")
    try:
        image = open_image(data, key, min_size=min_image_size)
    except ImageError as e:
        raise Skip(e.reason, e.detail) from None
    return Example(key, image, captions, prompt=read_prompt(raw, max_caption_chars))


def try_decode(raw: dict, **kw) -> Union[Example, str]:
    """`decode_sample`, returning the skip reason instead of raising."""
    try:
        return decode_sample(raw, **kw)
    except Skip as s:
        return s.reason


def to_item(example: Example, transform: Callable, rng: Optional[random.Random] = None) -> dict:
    """What collate needs from one example: pixels (or features), the caption to train on, all references."""
    caption = rng.choice(example.captions) if rng is not None else example.captions[0]
    item = {"caption": caption, "references": example.captions, "key": example.key}
    if example.prompt is not None:
        item["prompt"] = example.prompt
    if example.features is not None:
        return {"features": example.features, **item}
    with one_torch_thread():
        pixels = transform(example.image)
    return {"pixels": pixels, **item}


@contextmanager
def one_torch_thread():
    """Run a per-sample transform on one intra-op thread, then restore the setting.

    Its tensor ops are tiny, so extra threads only add hand-offs (on a busy 2-core machine, a
    hundred times slower than one thread). DataLoader workers are
    single-threaded already; this matters when the main process loads (num_workers=0).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SkipCounter:
    """Skipped samples by reason in one worker; each batch takes (and resets) the counts."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.logged: Counter = Counter()

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.logged[reason] += 1
        if self.logged[reason] <= LOGGED_SKIPS:
            log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
            if self.logged[reason] == LOGGED_SKIPS:
                log.warning("further %r skips in this worker are counted, not logged", reason)

    def take(self) -> dict[str, int]:
        counts = dict(self.counts)
        self.counts.clear()
        return counts


@dataclass
class Collate:
    """Stacks items into a batch dict; adds token ids when a tokenizer is set. When any sample has
    a prompt, the batch also holds `prompts` (None for the others) and `labels` (the prompt
    tokens masked out of the loss)."""

    skips: SkipCounter
    image_size: int
    tokenizer: Optional[Tokenizer] = None
    max_tokens: int = 40

    def __call__(self, items: list[dict]) -> dict:
        s = self.image_size
        captions = [it["caption"] for it in items]
        kinds = {"features" if "features" in it else "pixels" for it in items}
        if len(kinds) > 1:
            raise ValueError(f"a batch mixes image and features samples ({[it['key'] for it in items][:4]}...): "
                             "train either from images or from one `mmcap features` directory")
        kind = kinds.pop() if kinds else "pixels"
        with one_torch_thread():
            inputs = torch.stack([it[kind] for it in items]) if items else torch.empty(0, 3, s, s)
        batch = {
            kind: inputs,
            "captions": captions,
            "references": [it["references"] for it in items],
            "keys": [it["key"] for it in items],
            "skipped": self.skips.take(),
        }
        prompts = [it.get("prompt") for it in items]
        if any(p is not None for p in prompts):
            batch["prompts"] = prompts
        if self.tokenizer is not None:
            if items:
                with_prompts = {"prompts": prompts} if "prompts" in batch else {}
                tokens = self.tokenizer(captions, self.max_tokens, **with_prompts)
                batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
                if with_prompts:
                    batch["labels"] = tokens["labels"]
            else:
                batch["input_ids"] = batch["attention_mask"] = torch.zeros(0, 0, dtype=torch.long)
        return batch


# ---- shards to raw samples ----


class ShardErrors:
    """webdataset error handler for one shard: logs and counts by reason, never sleeps."""

    def __init__(self, url: str, skips: SkipCounter):
        self.url, self.skips, self.truncated = url, skips, False

    def __call__(self, exn: Exception) -> bool:
        reason = shard_error_reason(exn)
        if reason == "truncated_shard":
            if self.truncated:  # webdataset reports one truncation from two levels
                return True
            self.truncated = True
        self.skips.add(reason, self.url, f"{type(exn).__name__}: {str(exn)[:200]}")
        return True


def shard_error_reason(exn: Exception) -> str:
    text = str(exn.args[0]) if exn.args else ""
    if isinstance(exn, (EOFError, zlib.error)) or "unexpected end" in text or "truncated" in text:
        return "truncated_shard"
    if isinstance(exn, tarfile.TarError):
        return "unreadable_shard"
    if isinstance(exn, OSError):
        return "unopenable_shard"
    if isinstance(exn, ValueError) and "duplicate file name" in text:
        return "duplicate_member"
    return "read_error"


def read_shards(urls: Iterable, skips: SkipCounter, members: Optional[Iterable[str]] = SAMPLE_MEMBERS) -> Iterator[dict]:
    """Raw samples of each shard in turn (only `members` are read, all with None; nothing touches the disk)."""
    select = None if members is None else partial(wanted_member, extensions=frozenset(members))
    for url in urls:
        url = url["url"] if isinstance(url, dict) else url  # ResampledShards yields dicts
        handler = ShardErrors(url, skips)
        yield from wds.tarfile_samples([{"url": url}], handler=handler, select_files=select)
        if not handler.truncated and ends_cleanly(url) is False:
            handler(EOFError("shard ends without the end-of-archive blocks"))


def decode_items(raws: Iterable[dict], to_example: Callable[[dict], Example], to_batch_item: Callable,
                 skips: SkipCounter) -> Iterator[dict]:
    for raw in raws:
        try:
            example = to_example(raw)
        except Skip as s:
            skips.add(s.reason, f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}", s.detail)
            continue
        yield to_batch_item(example)


# ---- precomputed feature grids (`mmcap features`) ----


def features_to_bytes(grid: torch.Tensor) -> bytes:
    """A grid as `.npy` bytes; bfloat16 (which numpy lacks) is stored as its raw uint16 bits."""
    if grid.dtype == torch.bfloat16:
        array = grid.contiguous().view(torch.uint16).numpy()
    else:
        array = grid.contiguous().numpy()
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def features_from_bytes(data: bytes, name: str = "features") -> torch.Tensor:
    """The float32 grid [C, h, w] stored by `features_to_bytes`; ValueError naming `name` if bad."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError... for damaged data
        raise ValueError(f"{name}: unreadable .npy features ({type(e).__name__}: {e})") from None
    if array.ndim != 3:
        raise ValueError(f"{name}: features must be a grid [C, h, w], got shape {array.shape}")
    if array.dtype == np.uint16:  # bfloat16 bits
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16).float()
    if array.dtype not in (np.float32, np.float16):
        raise ValueError(f"{name}: features must be float32/float16/bfloat16, got {array.dtype}")
    return torch.from_numpy(array).float()
