"""What more than one benchmark (or tests/test_perf_equivalence.py) uses; not a script.

- the captioning model of bench_caption: its shape (`VOCAB` ... `GENERATION`), a stand-in
  tokenizer and `build_mmcap`;
- `NaivePipeline`: an mmcap model's weights run the obvious way (torchvision + transformers),
  the reference that mmcap's fp32 captions must equal; `VitGpt2Pipeline`, transformers'
  VisionEncoderDecoderModel of the same size class;
- `TransformersForward`: a decoder seen through a plain module, so that
  `mmcap.generation.generate.generate` runs it through the transformers forward instead of its lean
  GPT-2 path;
- synthetic photo-like JPEGs (`photo_jpeg`, `make_photos`); `held_out_keys` of demo shards;
- measuring: `clocks`, `best_time`, peak RSS, `machine_info` and `emit` (every benchmark's JSON
  line names the processor);
- `build_fit` and `quiet_fit_overrides`: model, datamodule and trainer as `mmcap fit` builds them;
  `StepTimer`, the callback that times its training steps after a warm-up.

The scripts import it as `common` (Python puts a script's own folder on `sys.path`); tests put
`benchmarks/` on `sys.path` first.
"""
from __future__ import annotations

import copy
import io
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw

from mmcap import Captioner
from mmcap.images import eval_transform
from mmcap.accel.precision import cpu_model
from mmcap.model.tokenizer import CaptionTokenizer

# ----------------------------------------------------------------------------- bench_caption's model
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


# ----------------------------------------------------------------------------- reference pipelines
class NaivePipeline:
    """An mmcap GPT-2 captioner's architecture and weights, written the obvious way in fp32: PIL +
    torchvision transforms, a torchvision ResNet grid (no pooling), the projection's Linear,
    LayerNorm and position table, then `GPT2LMHeadModel.generate(encoder_hidden_states=...)`."""

    def __init__(self, model: Captioner, device: str | torch.device = "cpu"):
        import torchvision
        from transformers import GPT2LMHeadModel

        if model.config.projection.kind != "linear":
            raise ValueError(f"the naive pipeline has a linear projection, not {model.config.projection.kind!r}")
        resnet = torchvision.models.get_model(model.config.encoder.arch)
        missing, unexpected = resnet.load_state_dict(model.encoder.torchvision_state_dict(), strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected, (missing, unexpected)
        self.backbone = torch.nn.Sequential(*list(resnet.children())[:-2]).eval()
        proj = model.projection
        self.linear, self.norm = copy.deepcopy(proj.proj), copy.deepcopy(proj.norm)
        self.row_embed, self.col_embed = proj.row_embed.detach().clone(), proj.col_embed.detach().clone()
        self.gpt2 = GPT2LMHeadModel(model.decoder.config).eval()
        self.gpt2.load_state_dict(model.decoder.state_dict())
        self.transform = eval_transform(model.config.image_size)  # the same pixels as mmcap's fp32 path
        self.tokenizer = model.tokenizer
        self.device = torch.device(device)
        for module in (self.backbone, self.linear, self.norm, self.gpt2):
            module.to(self.device)
        self.row_embed, self.col_embed = self.row_embed.to(self.device), self.col_embed.to(self.device)

    @torch.no_grad()
    def memory(self, paths: Sequence) -> torch.Tensor:
        """Image tokens [B, H*W, width] of image files."""
        pixels = torch.stack([self.transform(Image.open(p).convert("RGB")) for p in paths]).to(self.device)
        grid = self.backbone(pixels)  # [B, C, H, W]
        _, _, h, w = grid.shape
        memory = self.norm(self.linear(grid.flatten(2).transpose(1, 2)))
        return memory + (self.row_embed[:h, None] + self.col_embed[None, :w]).reshape(h * w, -1)

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, **generation_kwargs) -> torch.Tensor:
        """transformers' greedy or beam search from BOS; ids [B, 1 + new tokens]."""
        tok, b = self.tokenizer, memory.shape[0]
        return self.gpt2.generate(
            input_ids=torch.full((b, 1), tok.bos_id, device=memory.device),
            attention_mask=torch.ones(b, 1, dtype=torch.long, device=memory.device),
            encoder_hidden_states=memory, do_sample=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id, **generation_kwargs,
        )

    def caption(self, paths: Sequence, batch_size: int = BATCH_SIZE, **generation_kwargs) -> list[str]:
        out = []
        for start in range(0, len(paths), batch_size):
            ids = self.generate(self.memory(paths[start : start + batch_size]), **generation_kwargs)
            out += [self.tokenizer.hf.decode(row[1:], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False).strip() for row in ids]
        return out


class VitGpt2Pipeline:
    """transformers' VisionEncoderDecoderModel: ViT-B/16 + GPT-2 small, random init, fp32, with
    `ViTImageProcessor` and `generate`: the shape of the most downloaded captioning checkpoint."""

    def __init__(self, tokenizer: CaptionTokenizer, device: str | torch.device = "cpu"):
        from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                                  VisionEncoderDecoderModel)

        torch.manual_seed(1)
        special = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        decoder = GPT2Config(vocab_size=VOCAB, add_cross_attention=True, is_decoder=True, **special)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), decoder)
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id
        self.device = torch.device(device)
        self.model = VisionEncoderDecoderModel(config=cfg).eval().to(self.device)
        self.processor = ViTImageProcessor()
        self.tokenizer = tokenizer.hf

    @torch.no_grad()
    def caption(self, paths, batch_size: int) -> list[str]:
        out = []
        for start in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
            pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
            ids = self.model.generate(pixels, do_sample=False, **GENERATION)
            out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return out


class TransformersForward(torch.nn.Module):
    """`decoder` behind a plain module. `mmcap.generation.generate.generate` takes its lean path only for a
    `GPT2LMHeadModel` itself and decodes any other model through its transformers forward (with
    the caches): wrapping the same decoder gives that generic path, same weights and math."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder
        self.config = decoder.config

    def forward(self, **kwargs):
        return self.decoder(**kwargs)


# ----------------------------------------------------------------------------- inputs
def photo_jpeg(rng: np.random.Generator, size: tuple[int, int] = (640, 480), quality: int = 90) -> bytes:
    """A photo-like JPEG (width, height): a smooth colour field, a few shapes, sensor-like noise."""
    im = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(20, 160))
        box = [int(x - r), int(y - r * rng.uniform(0.5, 1.5)), int(x + r), int(y + r)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(im, dtype=np.float32) + rng.normal(0, 8, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    """`n` photo-like JPEG files in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:04d}.jpg"
        path.write_bytes(photo_jpeg(rng, size))
        paths.append(path)
    return paths


def held_out_keys(shards: str) -> set[str]:
    """Keys of the samples whose json marks a held-out combination, one the training split never
    shows (`mmcap data demo` writes the flag)."""
    from mmcap.data.shardlist import resolve_shards
    from mmcap.data.shards import read_members

    return {name[: -len(".json")] for path in resolve_shards(shards) for name, data in read_members(path)
            if name.endswith(".json") and json.loads(data).get("held_out")}


# ----------------------------------------------------------------------------- measuring
def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def clocks() -> tuple[float, float]:
    """Wall time, and CPU time of this process (all its threads): the CPU time hardly moves when
    other processes compete for the cores, so overheads compare fairly on a busy machine too."""
    return time.perf_counter(), time.process_time()


def best_time(fn: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """Best wall and best CPU seconds of `fn` over `repeats` calls after a warm-up call."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = clocks()
        fn()
        w1, c1 = clocks()
        wall, cpu = min(wall, w1 - w0), min(cpu, c1 - c0)
    return wall, cpu


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb(pid: Optional[int] = None) -> float:
    """Peak resident memory, in MiB, of this process (since start or `reset_peak_rss`) or of
    process `pid` (Linux only; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid is not None:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def machine_info() -> dict:
    """The machine a result was measured on: processor model, torch threads, load."""
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def emit(result: dict) -> dict:
    """Print `result` and the machine it was measured on as one JSON line; return what was printed."""
    result = {**result, **machine_info()}
    print(json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------- mmcap fit
def build_fit(config: str, overrides: list[str]):
    """Model, datamodule and trainer exactly as `mmcap fit --config CONFIG OVERRIDES...` builds them."""
    from mmcap.training.cli import build_cli

    cli = build_cli(["--config", config, *overrides], run=False)
    return cli.model, cli.datamodule, cli.trainer


def quiet_fit_overrides(root: str | os.PathLike) -> list[str]:
    """`mmcap fit` overrides for timing: no validation, progress bar, summary, logger, final test or
    export; checkpoints under `root`."""
    root = str(root)
    return [
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false", "--trainer.default_root_dir", root,
        "--checkpoint.dirpath", os.path.join(root, "checkpoints"), "--test_after_fit", "false",
        "--export_dir", "null",
    ]


class StepTimer(L.Callback):
    """Clocks (wall, CPU) and samples of the training steps after the first `warmup` (data loading included)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.samples = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.samples += batch["pixels"].shape[0]
            self.end = clocks()

    def rates(self) -> tuple[float, float]:
        """Samples per wall second and per CPU second."""
        return tuple(self.samples / (e - s) for s, e in zip(self.start, self.end))
