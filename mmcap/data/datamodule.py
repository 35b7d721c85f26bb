"""`CaptionDataModule`: webdataset shards in, batch dicts out, safe under DDP.

Distributed scheme (see `pipeline.TrainStream` and `pipeline.eval_chunks`):
- train, `resampled=True`: each reader draws shards at random; every rank runs
  ceil(samples_per_epoch / (world_size * batch_size)) batches per epoch (`with_epoch` on the loader).
- train, epoch mode, several ranks: shards are split over all ranks x workers; each reader yields
  the same number of batches, cycling its shards if it has less data, so ranks never fall out of
  step (no DDP hang) and no sample is dropped. Sample counts come from `shards.json` (written by
  `mmcap shards`) or a quick scan of the tar headers.
- train, epoch mode, one rank: every sample exactly once per epoch.
- val/test: every sample exactly once across ranks, in shard order; every rank runs the same
  number of batches. A batch can be empty (`keys == []`) when all its samples were unusable or
  the set has fewer samples than 2 x world_size: validation steps should return early on it.
- predict (`mmcap predict`): each rank reads distinct shards, every sample exactly once.
"""
from __future__ import annotations

import glob
import logging
import sys
from typing import Iterator, Optional, Union

import lightning as L
import webdataset as wds

from mmcap.data.image_stream import ImageStream
from mmcap.data.streams import EvalStream, TrainStream, iter_captions, iter_references
from mmcap.data.shardlist import resolve_shards, shard_counts

log = logging.getLogger(__name__)

Shards = Optional[Union[str, list[str]]]


class CaptionLoader(wds.WebLoader):
    """A WebLoader over ready-made batches that tells its stream which epoch it is in.

    Lightning calls `loader.sampler.set_epoch(epoch)` at every epoch start (also after a resume);
    the loader serves as its own "sampler" for that, with no batch sampler, which Lightning reads
    as "not shuffled by a sampler". Without Lightning the epoch simply counts up per iteration.
    """

    batch_sampler = None

    def __init__(self, stream, num_workers: int, num_batches: Optional[int] = None, cut: bool = False):
        # Inside a spawned process (Lightning's ddp_spawn) the default start method is spawn, and every
        # worker would re-import torch and mmcap each epoch (seconds each); on Linux, fork as usual.
        context = "fork" if num_workers > 0 and sys.platform.startswith("linux") else None
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         multiprocessing_context=context)
        self.stream, self.num_batches, self.epoch = stream, num_batches, 0
        if cut:  # an endless (resampled) stream: one epoch is num_batches batches
            self.with_epoch(nbatches=num_batches)

    @property
    def sampler(self) -> "CaptionLoader":
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this loader's length is not known in advance")
        return self.num_batches

    def __iter__(self):
        # A generator, so that merely calling iter() (Lightning does, to check) changes nothing.
        self.stream.epoch = self.epoch
        self.epoch += 1
        yield from super().__iter__()


class CaptionDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_shards: Shards = None,
        val_shards: Shards = None,
        test_shards: Shards = None,
        image_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: Optional[int] = None,
        max_caption_tokens: int = 40,
        hflip: bool = False,
        augment: bool = True,
        seed: int = 0,
        demo_dir: Optional[str] = None,
        demo_kind: str = "shapes",
        features_dir: Optional[str] = None,
        predict_shards: Shards = None,
    ):
        """Shard patterns: brace ranges, globs, lists, URLs (see `shardlist.resolve_shards`).

        With `demo_dir` set, the demo dataset (`demo_kind`: shapes or glyphs) is generated there if it
        is not complete yet, and
        any shard pattern left unset defaults to the demo's split (`demo_dir/train-*.tar`, ...).
        `features_dir` (made by `mmcap features`) trains from precomputed encoder grids: unset
        patterns default to its splits, and the model takes its frozen encoder from there.
        `augment=False` trains on the evaluation view of each image (no random crop), which is
        what features hold.
        """
        super().__init__()
        self.save_hyperparameters()
        if features_dir is not None:  # the splits extracted so far
            splits = {split: f"{features_dir}/{split}-*.tar" for split in ("train", "val", "test")}
            splits = {split: p if glob.glob(p) else None for split, p in splits.items()}
            train_shards, val_shards = train_shards or splits["train"], val_shards or splits["val"]
            test_shards = test_shards or splits["test"]
        if demo_dir is not None:
            train_shards = train_shards or f"{demo_dir}/train-*.tar"
            val_shards = val_shards or f"{demo_dir}/val-*.tar"
            test_shards = test_shards or f"{demo_dir}/test-*.tar"
        self.train_shards, self.val_shards, self.test_shards = train_shards, val_shards, test_shards
        self.predict_shards = predict_shards  # `mmcap predict`: images to caption (captions not needed)
        self.image_size, self.batch_size = image_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.max_caption_tokens, self.hflip, self.augment, self.seed = max_caption_tokens, hflip, augment, seed
        self.demo_dir, self.demo_kind, self.features_dir = demo_dir, demo_kind, features_dir
        if samples_per_epoch is not None and not resampled:
            log.warning("samples_per_epoch only applies with resampled=True; an epoch reads every shard once")
        # A picklable `tokenizer(captions, max_tokens) -> {"input_ids", "attention_mask"}`; when
        # set before the loaders are made, batches carry token ids for `captions`.
        self.tokenizer = None
        self._urls: dict[str, list[str]] = {}

    # ---- Lightning hooks ----

    def prepare_data(self) -> None:
        if self.demo_dir is not None:
            from mmcap.data.demo import demo_is_complete, make_demo

            if not demo_is_complete(self.demo_dir):
                make_demo(self.demo_dir, kind=self.demo_kind)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.demo_dir is not None:
            self.prepare_data()  # without a Trainer nobody else calls it; idempotent
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}.get(
            stage, ("train", "val", "test"))
        for split in wanted:
            if getattr(self, f"{split}_shards") is not None:
                self._shard_urls(split)  # fails now, naming any pattern that matches nothing

    def train_dataloader(self) -> CaptionLoader:
        urls = self._shard_urls("train")
        if urls is None:
            raise ValueError("no train_shards given")
        rank, world = self._rank_and_world()
        readers = max(1, self.num_workers)
        needs_counts = (world > 1 and not self.resampled) or (self.resampled and self.samples_per_epoch is None)
        counts = shard_counts(urls) if needs_counts else None
        stream = TrainStream(
            urls,
            batch_size=self.batch_size,
            image_size=self.image_size,
            hflip=self.hflip,
            augment=self.augment,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            seed=self.seed,
            rank=rank,
            world_size=world,
            counts=counts,
            tokenizer=self.tokenizer,
            max_caption_tokens=self.max_caption_tokens,
        )
        if self.resampled:
            samples = self.samples_per_epoch or sum(counts)
            num_batches = max(1, -(-samples // (world * self.batch_size)))
            return CaptionLoader(stream, self.num_workers, num_batches, cut=True)
        if world > 1:
            return CaptionLoader(stream, self.num_workers, readers * stream.batches_per_reader(readers))
        return CaptionLoader(stream, self.num_workers)

    def val_dataloader(self) -> Union[CaptionLoader, list]:
        return self._eval_loader("val")

    def test_dataloader(self) -> Union[CaptionLoader, list]:
        return self._eval_loader("test")

    def predict_dataloader(self) -> CaptionLoader:
        """`predict_shards`, rank r reading shards r, r + world_size, ...: every sample exactly once,
        however uneven the shards (ranks may run different numbers of batches: prediction never
        syncs them). Batches as `mmcap.data.image_stream.ImageStream` makes them; unusable images ride
        along in `errors`."""
        urls = self._shard_urls("predict")
        if urls is None:
            raise ValueError("no predict_shards given (--data.predict_shards)")
        rank, world = self._rank_and_world()
        stream = ImageStream([], urls[rank::world], image_size=self.image_size, batch_size=self.eval_batch_size)
        return CaptionLoader(stream, min(self.num_workers, len(stream.units)))

    # ---- what the training code needs (mmcap.data.interface.TrainingData) ----

    def set_tokenizer(self, tokenizer) -> None:
        """Batches made from now on carry token ids (`tokenizer` must be picklable for workers)."""
        self.tokenizer = tokenizer

    def train_captions(self, limit: Optional[int] = None) -> Iterator[str]:
        """Every training caption and prompt (images are not read): for training a tokenizer."""
        return iter_captions(self._train_urls(), limit)

    def train_references(self, limit: Optional[int] = None) -> Iterator[list[str]]:
        """The references of each training image: document frequencies for SCST's CIDEr-D."""
        return iter_references(self._train_urls(), limit)

    def _train_urls(self) -> list[str]:
        if self.demo_dir is not None:
            self.prepare_data()
        urls = self._shard_urls("train")
        if urls is None:
            raise ValueError("no train_shards given")
        return urls

    def _eval_loader(self, split: str) -> Union[CaptionLoader, list]:
        urls = self._shard_urls(split)
        if urls is None:
            return []
        rank, world = self._rank_and_world()
        stream = EvalStream(
            urls,
            shard_counts(urls),
            batch_size=self.eval_batch_size,
            image_size=self.image_size,
            rank=rank,
            world_size=world,
            tokenizer=self.tokenizer,
            max_caption_tokens=self.max_caption_tokens,
        )
        num_batches = stream.num_batches()
        return CaptionLoader(stream, min(self.num_workers, num_batches), num_batches)

    def _shard_urls(self, split: str) -> Optional[list[str]]:
        spec = getattr(self, f"{split}_shards")
        if spec is None:
            return None
        if split not in self._urls:
            self._urls[split] = resolve_shards(spec)
        return self._urls[split]

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world, _, _ = wds.utils.pytorch_worker_info()  # RANK/WORLD_SIZE or torch.distributed
        return rank, world
