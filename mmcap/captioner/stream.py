"""Captioning whole collections: `CaptionStream` runs a `Captioner` over the batches that
`mmcap.data.image_stream.ImageStream` decodes in DataLoader workers, with flat memory.

Results are what `Captioner.caption` gives for the same images and options (the same
preprocessing and the same `generate` call, under one inference plan for the whole stream). A
result is a dict: `image` (the path, or a shard sample's key), `caption` and `log_prob`, plus
`shard` for shard samples; an unusable image gives `error` (a reason such as `unreadable_image`)
and `detail` instead of a caption. Files come out in the order given; shard samples in shard
order, shards of different workers interleaved by batch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from mmcap.accel.plan import InferencePlan, as_plan
from mmcap.data.image_stream import ImageStream, Inputs, ResultId, count_images, image_loader, plan_inputs



@dataclass
class ResultBatch:
    records: list[dict]  # results in order (captions, then the batch's errors)
    finished_shards: list[str]  # shards whose every sample is in this or an earlier batch


class CaptionStream:
    """Iterate to get result dicts (see the module docstring); `batches()` gives them batch by batch
    with the shards each batch completes (for writers that close a file per shard).

    `total` is the number of images to caption when known up front (files, and local shards; None
    with remote shards); `shard_errors` counts shard-level read errors (truncated_shard, ...) so far.
    `done` lists results to skip (`result_id`s of an earlier run; `(shard, None)` skips a shard).
    `keep_members` adds each shard sample's raw members (`members`: {extension: bytes}) to its result.
    `prompt`: text every caption continues, as in `Captioner.caption`.
    """

    def __init__(self, model, inputs: Union[str, Sequence[str], Inputs], *, batch_size: int = 16,
                 num_workers: int = 2, precision: Union[str, InferencePlan] = "fp32", done: Iterable[ResultId] = (),
                 keep_members: bool = False, prompt: Optional[str] = None, **generation_kwargs):
        self.model, self.num_workers, self.prompt = model, num_workers, prompt
        self.options = model.generation_options(**generation_kwargs).to_dict()
        self.plan = as_plan(precision, model.device)  # resolved once for the whole stream
        planned = inputs if isinstance(inputs, Inputs) else plan_inputs(inputs)
        done = set(done)
        self.stream = ImageStream(planned.files, planned.shards, image_size=model.config.image_size,
                                  batch_size=batch_size, draft=self.plan.draft, done=done,
                                  keep_members=keep_members)
        self.total = count_images(planned, done)
        self.shard_errors: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches():
            yield from batch.records

    def batches(self) -> Iterator[ResultBatch]:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with self.plan.keeping_cast_weights():
                yield from self._result_batches()
        finally:
            model.train(was_training)

    def _result_batches(self) -> Iterator[ResultBatch]:
        for batch in image_loader(self.stream, self.num_workers):
            self.shard_errors.update(batch["skipped"])
            records = self._caption(batch) + batch["errors"]
            for record, members in zip(records, batch.get("members", ())):
                record["members"] = members
            yield ResultBatch(records, batch["finished_shards"])

    @torch.no_grad()
    def _caption(self, batch: dict) -> list[dict]:
        if not batch["keys"]:
            return []
        out = self.model.generate(batch["pixels"].to(self.model.device), precision=self.plan, prompt=self.prompt,
                                  **self.options)
        return caption_records(self.model.tokenizer, out, batch["keys"], batch["shards"])


def caption_records(tokenizer, out, keys: Sequence[str], shards: Sequence[Optional[str]]) -> list[dict]:
    """Result dicts for a `generate` output of the images named `keys` (from `shards`)."""
    records = []
    for i, (key, shard) in enumerate(zip(keys, shards)):
        record = {"image": key, "caption": tokenizer.decode(out.sequences[i, : out.lengths[i]]),
                  "log_prob": float(out.scores[i])}
        if shard is not None:
            record["shard"] = shard
        records.append(record)
    return records


def caption_stream(model, inputs, **kwargs) -> CaptionStream:
    """`CaptionStream(model, inputs, **kwargs)`: results of captioning `inputs`, streamed."""
    return CaptionStream(model, inputs, **kwargs)
