"""Reading image collections for captioning: files, folders and webdataset shards decoded in
DataLoader workers into ready-made batches, with flat memory.

    inputs ─ plan_inputs: files (folders read recursively) and shards (patterns, URLs, `pipe:`)
           ─ units: chunks of `batch_size` files, whole shards; unit i goes to worker i % workers
           ─ in each DataLoader worker: read, decode, resize (unusable images become error items)
           ─ main process: `Captioner.generate` per batch ─ result dicts, in order

Results are what `Captioner.caption` gives for the same images and options (the same
preprocessing and the same `generate` call). A result is a dict: `image` (the path, or a shard
sample's key), `caption` and `log_prob`, plus `shard` for shard samples; an unusable image gives
`error` (a reason such as `unreadable_image`) and `detail` instead of a caption. Files come out in
the order given; shard samples in shard order, shards of different workers interleaved by batch.

`mmcap.captioner.stream.CaptionStream` captions these batches; `mmcap predict` reuses `ImageStream`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import braceexpand
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcap.images import IMAGE_EXTENSIONS, ImageError, eval_transform, open_image
from mmcap.data.samples import MAX_IMAGE_BYTES, SkipCounter, one_torch_thread, read_prompt, read_shards
from mmcap.data.shardlist import SAMPLE_MEMBERS, TAR_SUFFIXES, count_samples, is_url, resolve_shards
from mmcap.data.shards import IMAGE_MEMBERS

# What identifies a result, for resuming: (None, path) for a file, (shard, key) for a shard sample.
ResultId = tuple[Optional[str], str]
WHOLE_SHARD = None  # `(shard, WHOLE_SHARD)` in `done`: skip that shard entirely


def result_id(record: dict) -> ResultId:
    return record.get("shard"), record["image"]


# ---- what to read ----


@dataclass
class Inputs:
    files: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)


def plan_inputs(inputs: Union[str, Sequence[str]]) -> Inputs:
    """Image files and shards named by `inputs`: files, folders (read recursively, sorted) and
    shard specs (anything ending in .tar/.tar.gz/.tgz after brace expansion, globs, URLs, `pipe:`).
    A shard pattern that matches nothing fails here; a missing image file becomes an error result."""
    planned = Inputs()
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            planned.files += sorted(str(p) for p in path.rglob("*")
                                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif is_shard_spec(item) and not (path.is_file() and not item.endswith(TAR_SUFFIXES)):
            planned.shards += resolve_shards(item)
        else:
            planned.files.append(item)
    return planned


def is_shard_spec(item: str) -> bool:
    return is_url(item) or all(p.endswith(TAR_SUFFIXES) for p in braceexpand.braceexpand(item))


# ---- decoding, in DataLoader workers ----


class ImageStream(IterableDataset):
    """Batches of decoded images from files and shards (`Captioner` preprocessing), built in the
    DataLoader's workers; use with `batch_size=None`.

    A batch: `pixels` float[B,3,S,S]; `keys` (image names) and `shards` (the shard of each, or
    None) of those B images; `prompts` (only where a shard sample's json member has a `prompt`:
    per image, that text or None); `errors`, the batch's unusable images as result dicts; `members`
    (with `keep_members`, the raw members of each sample, errors' included, in `keys` + `errors`
    order); `finished_shards`, shards read to the end with this batch; `skipped`, shard-level
    read errors by reason. Worker w of W takes units w, w+W, ... so that with files, the
    DataLoader (which visits workers in turn) returns batches in input order.
    """

    def __init__(self, files: Sequence[str], shards: Sequence[str], *, image_size: int, batch_size: int,
                 draft: bool = False, done: Iterable[ResultId] = (), keep_members: bool = False):
        super().__init__()
        self.image_size, self.batch_size, self.draft, self.keep_members = image_size, batch_size, draft, keep_members
        self.done = set(done)
        files = [f for f in files if (None, f) not in self.done]
        self.units = [("files", files[i : i + batch_size]) for i in range(0, len(files), batch_size)]
        self.units += [("shard", url) for url in shards if (url, WHOLE_SHARD) not in self.done]
        self.epoch = 0  # set by mmcap's CaptionLoader; the order never changes

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        transform = eval_transform(self.image_size)
        for kind, unit in self.units[worker::workers]:
            if kind == "files":
                yield self._collate([self._file_item(path, transform) for path in unit])
            else:
                yield from self._shard_batches(unit, transform)

    def _decode(self, source, name: str, transform) -> torch.Tensor:
        with one_torch_thread():
            return transform(open_image(source, name, min_size=self.image_size if self.draft else None))

    def _file_item(self, path: str, transform) -> dict:
        try:
            return {"image": path, "pixels": self._decode(path, path, transform)}
        except ImageError as e:
            return error_item(path, None, e)

    def _shard_batches(self, url: str, transform) -> Iterator[dict]:
        skips = SkipCounter()
        items, good = [], 0
        for raw in read_shards([url], skips, members=None if self.keep_members else SAMPLE_MEMBERS):
            key = str(raw.get("__key__"))
            if (url, key) in self.done:
                continue
            item = self._sample_item(raw, key, url, transform)
            items.append(item)
            good += "pixels" in item
            if good == self.batch_size:
                yield self._collate(items, skipped=skips.take())
                items, good = [], 0
        yield self._collate(items, finished=[url], skipped=skips.take())

    def _sample_item(self, raw: dict, key: str, url: str, transform) -> dict:
        ext = next((e for e in IMAGE_MEMBERS if e in raw), None)
        try:
            if ext is None:
                raise ImageError(key, "missing_image")
            data = bytes(raw[ext])
            if len(data) > MAX_IMAGE_BYTES:
                raise ImageError(key, "too_large", f"{len(data)} bytes")
            item = {"image": key, "shard": url, "pixels": self._decode(data, key, transform)}
            prompt = read_prompt(raw)
            if prompt is not None:
                item["prompt"] = prompt
        except ImageError as e:
            item = error_item(key, url, e)
        if self.keep_members:
            item["members"] = {k: v for k, v in raw.items() if not k.startswith("__")}
        return item

    def _collate(self, items: list[dict], finished: Sequence[str] = (), skipped: Optional[dict] = None) -> dict:
        good = [it for it in items if "pixels" in it]
        errors = [it for it in items if "pixels" not in it]
        s = self.image_size
        with one_torch_thread():
            pixels = torch.stack([it["pixels"] for it in good]) if good else torch.empty(0, 3, s, s)
        batch = {"pixels": pixels, "keys": [it["image"] for it in good], "shards": [it.get("shard") for it in good],
                 "errors": [{k: v for k, v in it.items() if k != "members"} for it in errors],
                 "finished_shards": list(finished), "skipped": skipped or {}}
        prompts = [it.get("prompt") for it in good]
        if any(p is not None for p in prompts):
            batch["prompts"] = prompts
        if self.keep_members:
            batch["members"] = [it["members"] for it in good + errors]
        return batch


def error_item(name: str, shard: Optional[str], error: ImageError) -> dict:
    item = {"image": name, "error": error.reason}
    if shard is not None:
        item["shard"] = shard
    if error.detail:
        item["detail"] = error.detail
    return item


def image_loader(stream: ImageStream, num_workers: int) -> DataLoader:
    """A DataLoader over `stream`'s ready-made batches (workers forked on Linux: no re-imports)."""
    workers = min(num_workers, len(stream.units))
    context = "fork" if workers > 0 and sys.platform.startswith("linux") else None
    return DataLoader(stream, batch_size=None, num_workers=workers, multiprocessing_context=context)


def count_images(planned: Inputs, done: set) -> Optional[int]:
    """Images left to caption, when it can be known without reading remote shards."""
    shards = {u for u in planned.shards if (u, WHOLE_SHARD) not in done}
    if any(is_url(u) for u in shards):
        return None
    files = sum((None, f) not in done for f in planned.files)
    done_in_shards = sum(1 for shard, key in done if shard in shards and key is not WHOLE_SHARD)
    return files + sum(count_samples(u) for u in shards) - done_in_shards
