"""Reading shards: pure per-sample functions, then the webdataset chains that feed training.

Train (one chain per DataLoader worker, open_clip style):

    shards ─ resampled (ResampledShards) or shuffled and split by rank and worker
           ─ tar → samples (errors counted by reason, never slept on)
           ─ shuffle buffer ─ decode + transform (unusable samples counted) ─ batch + collate

Eval: samples in shard order, every sample in exactly one batch on exactly one rank, every rank
the same number of batches (see `eval_chunks`).

A batch is a dict: `pixels` float[B,3,S,S] (or, from `mmcap features` shards, `features`
float[B,C,h,w] instead); `captions` list[str] (train: one reference chosen at
random; eval: the first); `references` list[list[str]]; `keys` list[str]; `skipped` {reason:
count} for samples this worker dropped since its previous batch; and, when a tokenizer is given,
`input_ids` / `attention_mask` long[B,T] for `captions`.

Skip reasons: missing_image, missing_caption, empty_caption, non_utf8, bad_json, empty_file,
unreadable_image, too_large (bytes or pixels), bad_features; shard-level: truncated_shard, unreadable_shard,
unopenable_shard, duplicate_member, read_error.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import tarfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..images import ImageError, eval_transform, open_image, train_transform
from .shardlist import CAPTION_MEMBERS, SAMPLE_MEMBERS, ShardSpec, ends_cleanly, resolve_shards, wanted_member
from .shards import FEATURE_MEMBER, IMAGE_MEMBERS, clean_caption

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 500  # longer captions are cut at a word boundary
MAX_IMAGE_BYTES = 32 * 2**20
LOGGED_SKIPS = 10  # per reason and worker; the rest are only counted

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
    features: Optional[torch.Tensor] = None  # a precomputed encoder grid [C, h, w] (`mmcap.features`)


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
        from ..features import features_from_bytes  # (mmcap.features imports this package)

        captions = read_captions(raw, max_caption_chars)
        try:
            return Example(key, None, captions, features_from_bytes(bytes(raw[FEATURE_MEMBER]), key))
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
    return Example(key, image, captions)


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
    if example.features is not None:
        return {"features": example.features, **item}
    with one_torch_thread():
        pixels = transform(example.image)
    return {"pixels": pixels, **item}


@contextmanager
def one_torch_thread():
    """Run a per-sample transform on one intra-op thread, then restore the setting.

    Its tensor ops are tiny, so extra threads only add hand-offs: on a busy 2-core machine a
    128 px train transform took 17 ms with 2 threads and 0.17 ms with one. DataLoader workers are
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
    """Stacks items into a batch dict; adds token ids when a tokenizer is set."""

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
        if self.tokenizer is not None:
            if items:
                tokens = self.tokenizer(captions, self.max_tokens)
                batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
            else:
                batch["input_ids"] = batch["attention_mask"] = torch.zeros(0, 0, dtype=torch.long)
        return batch


# ---- stages ----


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


def read_shards(urls: Iterable, skips: SkipCounter, members: Iterable[str] = SAMPLE_MEMBERS) -> Iterator[dict]:
    """Raw samples of each shard in turn (only `members` are read; nothing touches the disk)."""
    select = partial(wanted_member, extensions=frozenset(members))
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


# ---- who reads what ----


def split_shards(urls: Sequence[str], reader: int, num_readers: int, share: bool) -> list[str]:
    """Reader `reader` of `num_readers` (rank-major: rank * workers + worker) takes every
    `num_readers`-th shard. With fewer shards than readers, `share` gives each reader one
    shard anyway (shards are then read more than once) so that every reader can fill its batches."""
    mine = list(urls[reader::num_readers])
    if not mine and share:
        mine = [urls[reader % len(urls)]]
    return mine


def batches_per_reader(counts: Sequence[int], num_readers: int, batch_size: int) -> int:
    """Batches each reader yields per epoch in equalised mode.

    Enough for the heaviest possible share of shards (the largest ceil(shards / readers) ones), so
    no reader runs out of shards before the others, whatever the epoch's shuffle; readers with
    less data cycle their shards to fill the same count. Independent of the epoch, so the loader
    has a fixed length.
    """
    per_reader = max(1, -(-len(counts) // num_readers))
    load = sum(sorted(counts, reverse=True)[:per_reader])
    return max(1, -(-load // batch_size))


def eval_chunks(n: int, world_size: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Per rank, the [start, end) sample-index ranges of its eval batches.

    Samples are numbered in shard order and cut into world_size * K contiguous, near-equal
    slices, K = ceil(n / (world_size * batch_size)); rank r takes slices r*K .. r*K+K-1. Every
    sample lands in exactly one batch and every rank runs exactly K batches, so metrics never
    count a sample twice and no rank waits on another.
    """
    per_rank = max(1, -(-n // (world_size * batch_size)))
    total = per_rank * world_size
    bounds = [j * n // total for j in range(total + 1)]
    return [[(bounds[j], bounds[j + 1]) for j in range(r * per_rank, (r + 1) * per_rank)] for r in range(world_size)]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _seed(*parts) -> int:
    """A stable 63-bit seed from any mix of ints and strings."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ---- the streams DataLoaders iterate ----


class TrainStream(IterableDataset):
    """Training batches, built inside each DataLoader worker.

    Modes:
    - `resampled`: every reader draws shards with replacement (`wds.ResampledShards`) forever;
      the loader cuts epochs (`with_epoch`).
    - epoch, one rank: shards shuffled per epoch and split across workers; each sample once.
    - epoch, several ranks ("equalised"): shards shuffled per epoch (same order on every rank)
      and split across all readers; every reader yields exactly `batches_per_reader` batches,
      cycling its shards if it runs short. Ranks stay in step (no DDP hang) and every sample is
      seen at least once per epoch (exactly once when shards are balanced).
    `rank` and `world_size` are given explicitly; `epoch` is set by the loader before each epoch.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        batch_size: int,
        image_size: int = 224,
        hflip: bool = False,
        augment: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        counts: Optional[Sequence[int]] = None,
        tokenizer: Optional[Tokenizer] = None,
        max_caption_tokens: int = 40,
        max_caption_chars: int = MAX_CAPTION_CHARS,
    ):
        super().__init__()
        self.shards = list(shards)
        self.batch_size, self.image_size, self.hflip, self.augment = batch_size, image_size, hflip, augment
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.rank, self.world_size = rank, world_size
        self.counts = list(counts) if counts is not None else None
        self.tokenizer, self.max_caption_tokens = tokenizer, max_caption_tokens
        self.max_caption_chars = max_caption_chars
        self.equalised = not resampled and world_size > 1
        if self.equalised and self.counts is None:
            raise ValueError("epoch mode on several ranks needs per-shard sample counts")
        self.epoch = 0

    def batches_per_reader(self, num_workers: int) -> Optional[int]:
        if not self.equalised:
            return None
        return batches_per_reader(self.counts, self.world_size * max(1, num_workers), self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        reader = self.rank * num_workers + worker
        skips = SkipCounter()
        rng = random.Random(_seed(self.seed, self.epoch, reader, "captions"))
        collate = Collate(skips, self.image_size, self.tokenizer, self.max_caption_tokens)
        transform = train_transform(self.image_size, hflip=self.hflip) if self.augment else eval_transform(self.image_size)
        to_example = partial(decode_sample, min_image_size=self.image_size, max_caption_chars=self.max_caption_chars)
        to_batch_item = partial(to_item, transform=transform, rng=rng)

        def samples(shards, shuffle_seed):
            return wds.DataPipeline(
                wds.SimpleShardList(shards) if isinstance(shards, list) else shards,
                partial(read_shards, skips=skips),
                wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                            rng=random.Random(shuffle_seed)),
                partial(decode_items, to_example=to_example, to_batch_item=to_batch_item, skips=skips),
            )

        def batches(items, partial_last):
            return wds.batched(self.batch_size, collation_fn=collate, partial=partial_last)(iter(items))

        if self.resampled:
            shards = wds.ResampledShards(self.shards, seed=_seed(self.seed, self.epoch), deterministic=True,
                                         worker_seed=lambda: reader)
            yield from batches(samples(shards, _seed(self.seed, self.epoch, reader)), partial_last=False)
            return

        order = list(self.shards)
        random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(order)  # same order on every rank
        mine = split_shards(order, reader, self.world_size * num_workers, share=self.equalised)
        if not mine:
            return
        first_pass = samples(mine, _seed(self.seed, self.epoch, reader, 0))
        if not self.equalised:
            yield from batches(first_pass, partial_last=True)
            return
        target = self.batches_per_reader(num_workers)
        made = 0
        for batch in itertools.chain(batches(first_pass, partial_last=True),
                                     batches(self._cycle(mine, samples, reader), partial_last=False)):
            yield batch
            made += 1
            if made == target:
                return

    def _cycle(self, shards: list[str], samples: Callable, reader: int) -> Iterator[dict]:
        """Further passes over a reader's shards, each freshly shuffled, to top up its batches."""
        for n in itertools.count(1):
            order = list(shards)
            random.Random(_seed(self.seed, self.epoch, reader, n)).shuffle(order)
            got = 0
            for item in samples(order, _seed(self.seed, self.epoch, reader, n)):
                got += 1
                yield item
            if got == 0:
                raise RuntimeError(f"no usable samples in shards {shards}: cannot fill this rank's batches")


class EvalStream(IterableDataset):
    """Validation/test batches: fixed order, all references, each sample exactly once across
    ranks, the same number of batches on every rank (`eval_chunks`).

    Within a rank, worker w takes the rank's batches w, w + workers, ...; the DataLoader visits
    workers in turn, so the rank's batches arrive in sample order. Each worker opens only the
    shards that hold its samples. A batch whose samples were all unusable is still yielded,
    empty (`keys == []`), to keep ranks in step.
    """

    def __init__(
        self,
        shards: Sequence[str],
        counts: Sequence[int],
        *,
        batch_size: int,
        image_size: int = 224,
        rank: int = 0,
        world_size: int = 1,
        tokenizer: Optional[Tokenizer] = None,
        max_caption_tokens: int = 40,
        max_caption_chars: int = MAX_CAPTION_CHARS,
    ):
        super().__init__()
        if len(shards) != len(counts):
            raise ValueError("one count per shard")
        self.shards, self.counts = list(shards), list(counts)
        self.batch_size, self.image_size = batch_size, image_size
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.max_caption_tokens = tokenizer, max_caption_tokens
        self.max_caption_chars = max_caption_chars
        self.epoch = 0  # unused: eval order never changes

    def num_batches(self) -> int:
        return len(eval_chunks(sum(self.counts), self.world_size, self.batch_size)[self.rank])

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        chunks = iter(eval_chunks(sum(self.counts), self.world_size, self.batch_size)[self.rank][worker::num_workers])
        skips = SkipCounter()
        collate = Collate(skips, self.image_size, self.tokenizer, self.max_caption_tokens)
        transform = eval_transform(self.image_size)
        current, items = next(chunks, None), []
        if current is None:
            return
        for index, url, raw in self._indexed_samples(current[0], skips):
            while current is not None and index >= current[1]:
                yield collate(items)
                current, items = next(chunks, None), []
            if current is None:
                return
            if index < current[0]:
                continue
            try:
                example = decode_sample(raw, min_image_size=self.image_size, max_caption_chars=self.max_caption_chars)
            except Skip as s:
                skips.add(s.reason, f"{url}:{raw.get('__key__', '?')}", s.detail)
                continue
            items.append(to_item(example, transform))
        while current is not None:  # the last batch, and any whose samples never came (damaged shards)
            yield collate(items)
            current, items = next(chunks, None), []

    def _indexed_samples(self, start: int, skips: SkipCounter) -> Iterator[tuple[int, str, dict]]:
        """(global index, shard, raw sample) from the first shard holding index `start` on."""
        offset = 0
        for url, count in zip(self.shards, self.counts):
            first, offset = offset, offset + count
            if offset <= start:
                continue
            for i, raw in enumerate(read_shards([url], skips)):
                if i >= count:  # the index belongs to the next shard: never hand it out twice
                    log.warning("%s holds more samples than counted (%d); the rest are ignored", url, count)
                    break
                yield first + i, url, raw


# ---- plain iteration, for tools ----


def iter_samples(
    shards: ShardSpec,
    *,
    skipped: Optional[Counter] = None,
    min_image_size: Optional[int] = None,
    max_caption_chars: int = MAX_CAPTION_CHARS,
) -> Iterator[Example]:
    """Every usable sample of `shards` in order (one process, no workers): for `mmcap eval`.

    Unusable samples are skipped; pass a Counter as `skipped` to learn how many and why.
    """
    skips = SkipCounter()
    for raw in read_shards(resolve_shards(shards), skips):
        try:
            yield decode_sample(raw, min_image_size=min_image_size, max_caption_chars=max_caption_chars)
        except Skip as s:
            skips.add(s.reason, f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}", s.detail)
        finally:
            if skipped is not None:
                skipped.update(skips.take())
    if skipped is not None:
        skipped.update(skips.take())


def iter_references(shards: ShardSpec, limit: Optional[int] = None) -> Iterator[list[str]]:
    """The reference captions of each sample of `shards` (images are not even read): for CIDEr
    document frequencies. Samples without a usable caption are left out."""
    skips = SkipCounter()
    references = (refs for raw in read_shards(resolve_shards(shards), skips, members=CAPTION_MEMBERS)
                  if (refs := _captions_or_none(raw)))
    return itertools.islice(references, limit)


def iter_captions(shards: ShardSpec, limit: Optional[int] = None) -> Iterator[str]:
    """Every caption of `shards` (images are not even read): for training a tokenizer."""
    captions = (caption for refs in iter_references(shards) for caption in refs)
    return itertools.islice(captions, limit)


def _captions_or_none(raw: dict) -> list[str]:
    try:
        return read_captions(raw)
    except Skip:
        return []
