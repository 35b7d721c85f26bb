"""Captioning whole collections: `CaptionStream` runs a `Captioner` over the batches that
`mmcap.data.image_stream.ImageStream` decodes in DataLoader workers, with flat memory.

Results are what `Captioner.caption` gives for the same images and options (the same
preprocessing and the same `generate` call, under one inference plan for the whole stream). A
result is a dict: `image` (the path, or a shard sample's key), `caption` and `log_prob`, plus
`shard` for shard samples; an unusable image gives `error` (a reason such as `unreadable_image`)
and `detail` instead of a caption. Files come out in the order given; shard samples in shard
order, shards of different workers interleaved by batch.

Beam search over a stream refills slots (`mmcap.generation.refill`): as an image's caption
finishes, its beams' rows take the next image instead of idling until the batch's longest
caption ends. Results still come out batch by batch, in order. It applies where the decoder is
GPT-2 with its own cross-attention, mmcap's C++ kernels run on this CPU (`InferencePlan.
refill_attention`) and the options allow it (`refill.supports`: beams, no sampling, no banned
n-grams, no prompt); elsewhere, or with `refill=False`, batches decode one at a time.
"""
from __future__ import annotations

from collections import Counter, deque
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
    `refill`: refill the slots of finished images (module docstring) where it applies; `refilling`
    says whether this stream does.
    """

    def __init__(self, model, inputs: Union[str, Sequence[str], Inputs], *, batch_size: int = 16,
                 num_workers: int = 2, precision: Union[str, InferencePlan] = "fp32", done: Iterable[ResultId] = (),
                 keep_members: bool = False, prompt: Optional[str] = None, refill: bool = True,
                 **generation_kwargs):
        self.model, self.num_workers, self.prompt, self.batch_size = model, num_workers, prompt, batch_size
        self.options = model.generation_options(**generation_kwargs).to_dict()
        self.plan = as_plan(precision, model.device)  # resolved once for the whole stream
        self.refill_attention = self._refill_attention() if refill else None
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

    @property
    def refilling(self) -> bool:
        return self.refill_attention is not None

    def _refill_attention(self):
        """The attention backend slot refill decodes with, or None where it does not apply."""
        from mmcap.generation import refill
        from mmcap.generation.gpt2_pass import GPT2Decoding

        model, decoder = self.model, self.model.decoder
        fusion = getattr(model, "fusion", None)
        cfg = model.generation_options(**self.options)
        if not (refill.supports(cfg, self.prompt) and GPT2Decoding.supports(decoder, False)
                and (fusion is None or fusion.own_cross_attention)):
            return None
        return self.plan.refill_attention(decoder.config.hidden_size // decoder.config.num_attention_heads)

    def _result_batches(self) -> Iterator[ResultBatch]:
        if self.refilling:
            yield from self._refilled_batches()
            return
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

    def _refilled_batches(self) -> Iterator[ResultBatch]:
        """The loader's batches, decoded with slot refill; each batch's results once all its images
        are done. The decoding runs inside the plan's contexts, the caller's code between batches
        outside them (as batch by batch)."""
        from mmcap.generation.gpt2_pass import GPT2Decoding
        from mmcap.generation.refill import refill_beam_search

        model, plan, tok = self.model, self.plan, self.model.tokenizer
        cfg = model.generation_options(**self.options)
        pending: deque = deque()  # [batch, its records so far, images left], in loader order

        def images():
            for batch in image_loader(self.stream, self.num_workers):
                self.shard_errors.update(batch["skipped"])
                entry = [batch, [None] * len(batch["keys"]), len(batch["keys"])]
                pending.append(entry)
                if not batch["keys"]:
                    continue
                with plan.computing():  # the encoder as `generate` runs it (the decoder's context turns autocast off)
                    memory = plan.project(model.projection, plan.encode(model.encoder, batch.pop("pixels").to(model.device)))
                memory = memory.float() if plan.int8_decoder else memory
                for i in range(len(batch["keys"])):
                    yield (entry, i), memory[i]

        def make_pass(memory):
            return GPT2Decoding(model.decoder, memory, max_len=1 + cfg.max_new_tokens, attention=self.refill_attention)

        def until_a_batch_is_done(results) -> tuple[list[ResultBatch], bool]:
            for (entry, i), tokens, log_prob in results:
                batch = entry[0]
                record = {"image": batch["keys"][i], "caption": tok.decode(tokens), "log_prob": log_prob}
                if batch["shards"][i] is not None:
                    record["shard"] = batch["shards"][i]
                entry[1][i], entry[2] = record, entry[2] - 1
                ready = list(_completed(pending))
                if ready:
                    return ready, True
            return list(_completed(pending)), False

        results = refill_beam_search(make_pass, images(), self.batch_size, tok.bos_id, tok.eos_id, tok.pad_id, cfg)
        more = True
        while more:
            with torch.no_grad(), plan.computing(), plan.decoding(model.decoder, torch.empty(0)):
                ready, more = until_a_batch_is_done(results)
            yield from ready


def _completed(pending: deque) -> Iterator[ResultBatch]:
    """The batches at the head of `pending` whose every image is done, in order."""
    while pending and pending[0][2] == 0:
        batch, records, _ = pending.popleft()
        out = records + batch["errors"]
        for record, members in zip(out, batch.get("members", ())):
            record["members"] = members
        yield ResultBatch(out, batch["finished_shards"])


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
