"""The plain-loop baseline of bench_recipe: an image captioner trained the obvious way, in a time
budget, with nothing from mmcap (mmcap never imports this file either).

- every training image decoded once into memory (uint8), no augmentation, no validation;
- encoder: torchvision ResNet-18 (random init) up to layer3 (a 4x4 grid at 64 px), then
  Linear(256, 256) + learned positions;
- decoder: transformers' GPT2LMHeadModel, 3 layers, width 256, 4 heads, with cross-attention
  (GPT2Config's default dropout 0.1);
- a word-level tokenizer built from the training captions;
- fp32, AdamW (lr 5e-4 constant, weight decay 0.01 on every parameter), batch 32, one random
  reference per image per step, teacher-forced cross-entropy;
- after the budget: beam search (3 beams, 20 new tokens at most) over the test split.

The clock starts before the training shards are read: decoding them counts against the budget.

    python benchmarks/plain_loop.py --train 'data/objects/train-*.tar' --test 'data/objects/test-*.tar' \
        --budget 300 --out runs/plain

writes OUT/predictions.json ({key: caption}) and OUT/result.json (steps, where the time went),
and prints result.json's line.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_kinds import read_split  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
PAD, BOS, EOS, UNK = 0, 1, 2, 3


def words(caption: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", caption.lower())


class WordTokenizer:
    def __init__(self, captions):
        vocab = sorted({w for c in captions for w in words(c)})
        self.itos = ["<pad>", "<bos>", "<eos>", "<unk>"] + vocab
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode(self, caption: str, max_len: int) -> list[int]:
        ids = [BOS] + [self.stoi.get(w, UNK) for w in words(caption)][: max_len - 2] + [EOS]
        return ids + [PAD] * (max_len - len(ids))

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.itos[i])
        return " ".join(out)


def load_images(samples, image_size: int) -> torch.Tensor:
    """uint8 [N, 3, S, S]: each image decoded once (centre square, resized if not S already)."""
    out = np.empty((len(samples), image_size, image_size, 3), dtype=np.uint8)
    for i, (_, data, _, _) in enumerate(samples):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = im.size
        if (w, h) != (image_size, image_size):
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(im)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def normalise(pixels_u8: torch.Tensor) -> torch.Tensor:
    return (pixels_u8.float() / 255 - MEAN) / STD


class PlainCaptioner(nn.Module):
    def __init__(self, vocab_size: int, grid: int, max_len: int):
        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        self.encoder = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
        self.proj = nn.Linear(256, 256)
        self.pos = nn.Parameter(torch.randn(grid * grid, 256) * 0.02)
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=max_len, n_embd=256, n_layer=3, n_head=4,
                         add_cross_attention=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        self.decoder = GPT2LMHeadModel(cfg)

    def memory(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = self.encoder(pixels)  # [B, 256, g, g]
        return self.proj(grid.flatten(2).transpose(1, 2)) + self.pos

    def forward(self, pixels, ids):
        mem = self.memory(pixels)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        logits = self.decoder(input_ids=inputs, attention_mask=(inputs != PAD).long(), encoder_hidden_states=mem).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)


@torch.no_grad()
def beam_search(model: PlainCaptioner, pixels: torch.Tensor, beams: int = 3, max_new: int = 20,
                length_penalty: float = 1.0, bos: int = BOS, eos: int = EOS) -> list[list[int]]:
    """Standard beam search (transformers' rules: 2 x beams candidates per step, a finished
    hypothesis scores sum log p / length ** length_penalty, an image is done once it has `beams`
    finished ones no live beam can beat)."""
    b = pixels.shape[0]
    mem = model.memory(pixels).repeat_interleave(beams, 0)
    seqs = torch.full((b * beams, 1), bos, dtype=torch.long)
    scores = torch.zeros(b, beams)
    scores[:, 1:] = -math.inf  # all beams start equal: keep one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(max_new):
        logits = model.decoder(input_ids=seqs, encoder_hidden_states=mem).logits[:, -1].float()
        logp = F.log_softmax(logits, dim=-1)
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(b, beams * vocab)
        top, idx = cand.topk(2 * beams, dim=1)
        next_seqs, next_scores = [], torch.full((b, beams), -math.inf)
        cur_len = step + 1  # generated tokens, this one included
        for i in range(b):
            row = []
            if not done[i]:
                for rank, (s, j) in enumerate(zip(top[i].tolist(), idx[i].tolist())):
                    beam, tok = divmod(j, vocab)
                    prev = seqs[i * beams + beam]
                    if tok == eos:
                        if rank < beams:
                            finished[i].append((s / cur_len ** length_penalty, prev[1:].tolist()))
                    else:
                        row.append((s, torch.cat([prev, prev.new_tensor([tok])])))
                    if len(row) == beams:
                        break
                finished[i].sort(key=lambda x: -x[0])
                del finished[i][beams:]
                if len(finished[i]) >= beams and row and row[0][0] / cur_len ** length_penalty <= finished[i][-1][0]:
                    done[i] = True
            while len(row) < beams:  # done images: dummy beams that never win
                row.append((-math.inf, torch.cat([seqs[i * beams], seqs.new_tensor([eos])])))
            for k, (s, seq) in enumerate(row):
                next_scores[i, k] = s
                next_seqs.append(seq)
        seqs, scores = torch.stack(next_seqs), next_scores
        if all(done):
            break
    out = []
    for i in range(b):
        if not finished[i] or not done[i]:  # out of tokens: live beams count as they are
            for k in range(beams):
                if scores[i, k] > -math.inf:
                    finished[i].append((scores[i, k].item() / seqs.shape[1] ** length_penalty,
                                        seqs[i * beams + k, 1:].tolist()))
        out.append(max(finished[i], key=lambda x: x[0])[1])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="training shards (glob)")
    p.add_argument("--test", required=True, help="test shards (glob)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--budget", type=float, default=300.0, help="training seconds (decoding the shards included)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the budget decides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    started = time.perf_counter()
    train = read_split(args.train)
    images = load_images(train, args.image_size)
    tok = WordTokenizer(c for _, _, caps, _ in train for c in caps)
    max_len = min(32, 2 + max(len(words(c)) for _, _, caps, _ in train for c in caps))
    n_refs = max(len(caps) for _, _, caps, _ in train)
    ids = torch.full((len(train), n_refs, max_len), PAD, dtype=torch.long)
    n_caps = torch.tensor([len(caps) for _, _, caps, _ in train])
    for i, (_, _, caps, _) in enumerate(train):
        for j, c in enumerate(caps):
            ids[i, j] = torch.tensor(tok.encode(c, max_len))
    loaded = time.perf_counter()
    grid = -(-args.image_size // 16)
    model = PlainCaptioner(len(tok.itos), grid, max_len).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    built = time.perf_counter()

    steps, data_s, compute_s, losses = 0, 0.0, 0.0, []
    perm, cursor = torch.randperm(len(train), generator=gen), 0
    deadline = started + args.budget
    while time.perf_counter() < deadline and (args.max_steps <= 0 or steps < args.max_steps):
        t0 = time.perf_counter()
        if cursor + args.batch_size > len(train):
            perm, cursor = torch.randperm(len(train), generator=gen), 0
        index = perm[cursor: cursor + args.batch_size]
        cursor += args.batch_size
        which = (torch.rand(len(index), generator=gen) * n_caps[index]).long()
        pixels, batch_ids = normalise(images[index]), ids[index, which]
        batch_ids = batch_ids[:, : int((batch_ids != PAD).sum(1).max())]
        t1 = time.perf_counter()
        loss = model(pixels, batch_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        data_s, compute_s, steps = data_s + t1 - t0, compute_s + t2 - t1, steps + 1
        if steps % 50 == 0:
            losses.append(round(loss.item(), 4))
            print(f"step {steps} loss {losses[-1]} {time.perf_counter() - started:.1f} s load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr, flush=True)
    trained = time.perf_counter()

    model.eval()
    test = read_split(args.test)
    test_pixels = normalise(load_images(test, args.image_size))
    predictions = {}
    for s in range(0, len(test), 50):
        for (key, _, _, _), seq in zip(test[s: s + 50], beam_search(model, test_pixels[s: s + 50], args.beams,
                                                                    args.max_new_tokens)):
            predictions[key] = tok.decode(seq)
    captioned = time.perf_counter()
    window = trained - started
    result = {
        "arm": "plain", "steps": steps, "samples": steps * args.batch_size, "budget_s": args.budget,
        "window_s": round(window, 2),
        "time": {"compute": round(compute_s, 2), "data": round(data_s + (loaded - started), 2), "validation": 0.0,
                 "checkpoint": 0.0, "rest": round(window - compute_s - data_s - (loaded - started), 2)},
        "decode_shards_s": round(loaded - started, 2), "build_model_s": round(built - loaded, 2),
        "train_samples_per_s": round(steps * args.batch_size / window, 2),
        "compute_samples_per_s": round(steps * args.batch_size / max(compute_s, 1e-9), 2),
        "test_caption_s": round(captioned - trained, 2), "test_images": len(test), "num_beams": args.beams,
        "loss_every_50": losses, "vocab": len(tok.itos), "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()), "loadavg_end": os.getloadavg(),
    }
    (out / "predictions.json").write_text(json.dumps(predictions, indent=0))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
