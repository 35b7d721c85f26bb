"""Caption tokenizers: the pretrained decoder's own, or one trained from the captions.

`CaptionTokenizer` wraps a Hugging Face fast tokenizer with the conventions a captioner needs:
every caption is `BOS w1 .. wn EOS`, padded on the right with PAD. GPT-2 has no PAD and uses
`<|endoftext|>` for both BOS and EOS; BERT uses [CLS] as BOS and [SEP] as EOS; a tokenizer
without BOS (Qwen2's) starts with EOS; without PAD, EOS pads. Chat templates are never applied:
a caption is plain text. The object is
small and picklable, so DataLoader workers can tokenise in `collate`.

A prompt goes between BOS and the caption, `BOS p1 .. pk w1 .. wn EOS`; prompt and caption are
tokenised apart, so a caption's tokens are the same with or without a prompt. `labels` marks
what is trained: the caption and EOS, never BOS, the prompt or padding (-100 there).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mmcap.config import TokenizerConfig

SPECIALS = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]"}


class CaptionTokenizer:
    def __init__(self, hf: PreTrainedTokenizerBase):
        self.hf = hf
        if hf.cls_token is not None and hf.sep_token is not None:  # BERT family
            self.bos_id, self.eos_id = hf.cls_token_id, hf.sep_token_id
        elif hf.eos_token is not None:
            # Without a BOS (Qwen2's tokenizers) EOS starts the caption, as GPT-2's one token does both.
            self.bos_id = hf.bos_token_id if hf.bos_token is not None else hf.eos_token_id
            self.eos_id = hf.eos_token_id
        else:
            raise ValueError("tokenizer needs an EOS (or CLS/SEP) special token")
        # GPT-2 has no PAD: reuse EOS; padded positions are masked out of the loss anyway.
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, caption: str, max_tokens: Optional[int] = None, prompt: Optional[str] = None) -> list[int]:
        """`BOS [prompt] caption EOS`; `max_tokens` bounds the caption with its BOS and EOS (the
        prompt comes on top)."""
        return [self.bos_id, *self.prompt_ids(prompt), *self._caption_ids(caption, max_tokens), self.eos_id]

    def _caption_ids(self, caption: str, max_tokens: Optional[int]) -> list[int]:
        ids = self.hf(caption.strip(), add_special_tokens=False)["input_ids"]
        return ids[: max(0, max_tokens - 2)] if max_tokens is not None else ids

    def prompt_ids(self, prompt: Optional[str]) -> list[int]:
        """The tokens of a prompt (none for None or blank text)."""
        if not prompt or not prompt.strip():
            return []
        return self.hf(prompt.strip(), add_special_tokens=False)["input_ids"]

    def __call__(self, captions: list[str], max_tokens: Optional[int] = None,
                 prompts: Optional[list[Optional[str]]] = None) -> dict[str, torch.Tensor]:
        """Tokenise a batch, padded on the right to the longest sequence: `input_ids`,
        `attention_mask` and `labels` (the ids, -100 at BOS, prompt and padding)."""
        prompts = prompts if prompts is not None else [None] * len(captions)
        if len(prompts) != len(captions):
            raise ValueError(f"got {len(captions)} captions but {len(prompts)} prompts")
        heads = [[self.bos_id, *self.prompt_ids(p)] for p in prompts]  # not trained on
        seqs = [head + self._caption_ids(c, max_tokens) + [self.eos_id] for head, c in zip(heads, captions)]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, head) in enumerate(zip(seqs, heads)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
            labels[i, len(head) : len(s)] = input_ids[i, len(head) : len(s)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the tokens up to the first EOS, BOS/PAD dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.bos_id, self.pad_id):
                out.append(i)
        return self.hf.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """One display string per id (for attention plots)."""
        return [self.hf.decode([int(i)]).strip() for i in ids]

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    @classmethod
    def load(cls, directory: str | Path) -> "CaptionTokenizer":
        """Load tokenizer files (JSON/text only; never remote code)."""
        return cls(AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False))

    def to_files(self) -> dict[str, str]:
        """The tokenizer's files as {name: text}: plain strings fit a weights_only checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}

    @classmethod
    def from_files(cls, files: dict[str, str]) -> "CaptionTokenizer":
        """The inverse of `to_files`; file names with a directory part are refused."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                if Path(name).name != name:
                    raise ValueError(f"bad tokenizer file name: {name!r}")
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            return cls.load(tmp)

    @classmethod
    def train(cls, captions: Iterable[str], cfg: TokenizerConfig = TokenizerConfig()) -> "CaptionTokenizer":
        return cls(train_tokenizer(captions, cfg))


def train_tokenizer(captions: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train a word-level or byte-level BPE tokenizer with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = list(SPECIALS.values())
    norm = [normalizers.NFKC(), normalizers.Strip()] + ([normalizers.Lowercase()] if cfg.lowercase else [])
    if cfg.kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies punctuation
        trainer = trainers.WordLevelTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials
        )
    elif cfg.kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise ValueError(f"tokenizer.kind must be 'wordlevel' or 'bpe', got {cfg.kind!r}")
    tok.normalizer = normalizers.Sequence(norm)
    tok.train_from_iterator((c for c in captions if c and c.strip()), trainer=trainer)
    if tok.get_vocab_size() <= len(specials):
        raise ValueError("cannot train a tokenizer: no non-empty captions were given")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
