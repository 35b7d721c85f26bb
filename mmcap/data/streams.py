"""The webdataset chains that DataLoaders iterate: training batches (`TrainStream`), evaluation
batches (`EvalStream`) and plain in-order iteration for tools (`iter_samples`).

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
`input_ids` / `attention_mask` long[B,T] for `captions`. When any sample's `json` member has a
`prompt`, the batch adds `prompts` list[str | None] and `labels` long[B,T] (`BOS prompt caption EOS`
with -100 at BOS, the prompt and padding: the prompt conditions the caption, it is not trained on).
Per-sample steps live in `samples.py`.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections import Counter
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mmcap.images import eval_transform, train_transform
from mmcap.data.samples import (MAX_CAPTION_CHARS, Collate, Example, Skip, SkipCounter, Tokenizer, decode_items, decode_sample,
                      read_captions, read_prompt, read_shards, to_item)
from mmcap.data.shardlist import CAPTION_MEMBERS, ShardSpec, resolve_shards

log = logging.getLogger(__name__)


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
    """Every caption of `shards`, and every prompt (images are not even read): for training a
    tokenizer, which then knows the prompts' words too."""
    skips = SkipCounter()
    texts = (text for raw in read_shards(resolve_shards(shards), skips, members=CAPTION_MEMBERS)
             for text in _texts(raw))
    return itertools.islice(texts, limit)


def _texts(raw: dict) -> list[str]:
    """A usable sample's captions, then its prompt if it has one."""
    captions = _captions_or_none(raw)
    prompt = read_prompt(raw) if captions else None
    return captions + [prompt] if prompt else captions


def _captions_or_none(raw: dict) -> list[str]:
    try:
        return read_captions(raw)
    except Skip:
        return []
