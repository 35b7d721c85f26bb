"""Gathering Python objects from every rank (metrics, skip counts), a no-op outside DDP."""
from __future__ import annotations

from typing import Any

import torch


def gather_from_ranks(obj: Any) -> list:
    """`obj` of every rank, in rank order (`[obj]` outside distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return [obj]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def gather_predictions(outputs: list[tuple[str, str, list[str]]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(references, predictions) by sample key from all ranks; a key seen twice (a sample repeated
    to even out the ranks) counts once."""
    outputs = [item for part in gather_from_ranks(outputs) for item in part]
    references, predictions = {}, {}
    for key, caption, refs in outputs:
        if key not in predictions:
            predictions[key], references[key] = caption, list(refs)
    return references, predictions
