"""What a training step wraps its forward pass in: a frozen encoder, token dropout."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen_encoder(encoder: nn.Module) -> Iterator[None]:
    """No gradients into the encoder and BatchNorm statistics fixed, for one forward pass.

    The parameters stay in the optimizer (and in DDP's reducer) all along, so unfreezing is
    just the end of this context.
    """
    params = list(encoder.parameters())
    flags, was_training = [p.requires_grad for p in params], encoder.training
    encoder.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        encoder.train(was_training)

@contextlib.contextmanager
def token_dropout(captioner, rate: float) -> Iterator[None]:
    """Replace input word embeddings by UNK's (the targets stay intact), for one forward pass."""
    embedding = captioner.decoder.get_input_embeddings()
    tok = captioner.tokenizer
    unk = tok.hf.unk_token_id if tok.hf.unk_token_id is not None else tok.pad_id

    def drop_words(module, args, output):
        ids = args[0]
        drop = (torch.rand(ids.shape, device=ids.device) < rate) & (ids != tok.bos_id)
        return torch.where(drop[..., None], module.weight[unk].to(output.dtype), output)

    handle = embedding.register_forward_hook(drop_words)
    try:
        yield
    finally:
        handle.remove()
