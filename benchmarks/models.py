"""bench_caption's captioning model, shared by the benchmarks: its shape (`VOCAB` ... `GENERATION`),
a stand-in tokenizer of GPT-2's size and `build_mmcap` (random weights, nothing downloaded)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from mmcap import Captioner
from mmcap.model.tokenizer import CaptionTokenizer

VOCAB, BEAMS, NEW_TOKENS, IMAGE_SIZE, BATCH_SIZE = 50257, 3, 20, 224, 16
GENERATION = dict(num_beams=BEAMS, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS)  # exactly 20 tokens


def stand_in_tokenizer(vocab_size: int = VOCAB) -> CaptionTokenizer:
    """A word-level tokenizer over made-up words, GPT-2's size, `<|endoftext|>` as BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: set[str] = set()
    while len(words) < vocab_size - 1:
        words.add("".join(rng.choice(letters, int(rng.integers(2, 10)))))
    vocab = {w: i for i, w in enumerate(sorted(words))}
    special = "<|endoftext|>"
    vocab[special] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return CaptionTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                                    unk_token=special))


def build_mmcap(tokenizer: Optional[CaptionTokenizer] = None) -> Captioner:
    """ResNet-50 at 224 px, linear projection, a decoder of GPT-2 small's shape; random weights."""
    torch.manual_seed(0)
    cfg = {
        "encoder": {"arch": "resnet50"},
        "projection": {"kind": "linear", "max_grid": 16},
        "decoder": {"family": "gpt2", "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                    "max_positions": 1024, "dropout": 0.1},
        "image_size": IMAGE_SIZE,
        "max_caption_tokens": NEW_TOKENS,
    }
    return Captioner.from_config(cfg, tokenizer=tokenizer or stand_in_tokenizer()).eval()
