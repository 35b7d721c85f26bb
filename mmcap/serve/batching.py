"""Dynamic batching: concurrent requests that share a key (their generation options) run as
one batch on the model, up to `max_batch_size` requests or `timeout` seconds after the first.

One worker thread runs the model, so batches never compete for the cores; while it is busy,
new requests gather and go in the next batch. Requests with different keys never share a batch.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Hashable

import torch

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, run: Callable[[Hashable, list], list], max_batch_size: int = 16, timeout: float = 0.01):
        """`run(key, items)` returns one result per item; it runs on the worker thread."""
        if max_batch_size < 1 or timeout < 0:
            raise ValueError(f"need max_batch_size >= 1 and timeout >= 0, got {max_batch_size}, {timeout}")
        self.run, self.max_batch_size, self.timeout = run, max_batch_size, timeout
        # torch's thread setting is per thread: the worker takes the one this process was given
        self.worker = ThreadPoolExecutor(1, "mmcap-model", initializer=torch.set_num_threads,
                                         initargs=(torch.get_num_threads(),))
        self.pending: dict[Hashable, list[tuple[Any, asyncio.Future]]] = {}  # oldest key first
        self.since: dict[Hashable, float] = {}
        self.arrived = asyncio.Event()

    async def submit(self, key: Hashable, item: Any) -> tuple[Any, int]:
        """The result for `item` and the size of the batch it ran in."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if key not in self.pending:
            self.pending[key], self.since[key] = [], loop.time()
        self.pending[key].append((item, future))
        self.arrived.set()
        return await future

    async def serve_forever(self) -> None:
        while True:
            batch_key, batch = await self._next_batch()
            batch = [(item, future) for item, future in batch if not future.done()]  # skip callers gone
            if not batch:
                continue
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.worker, self.run, batch_key, [item for item, _ in batch])
            except Exception as e:
                log.exception("a batch of %d failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result((result, len(batch)))

    async def _next_batch(self) -> tuple[Hashable, list]:
        loop = asyncio.get_running_loop()
        while not self.pending:
            self.arrived.clear()
            await self.arrived.wait()
        key = next(iter(self.pending))
        deadline = self.since[key] + self.timeout
        while len(self.pending[key]) < self.max_batch_size and loop.time() < deadline:
            self.arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
        waiting = self.pending[key]
        batch, self.pending[key] = waiting[: self.max_batch_size], waiting[self.max_batch_size :]
        if not self.pending[key]:
            del self.pending[key], self.since[key]
        return key, batch

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
