"""Captions per second, end to end (JPEG files in, strings out), for a captioner of real size.

    python benchmarks/bench_caption.py                 # one JSON line (about 3-5 minutes on 2 cores)
    python benchmarks/bench_caption.py --levers        # adds the table of what each speed lever gives
    python benchmarks/bench_caption.py --quality runs/demo/model --data 'data/demo/test-*.tar'

The model: ResNet-50 at 224 px, a linear projection and a decoder of GPT-2 small's shape (12
layers, width 768, 12 heads, vocabulary 50,257) with random weights and a stand-in word-level
tokenizer, since nothing can be downloaded. Every system decodes with beam 3 and exactly 20 new
tokens, batch 16, over JPEG photos (640x480) written here, all in one process:

- ``mmcap``: ``Captioner.caption(paths, precision="auto")`` (bf16 on CPUs with bf16 instructions);
- ``naive`` (a): the same weights run the obvious way: fp32, PIL + torchvision transforms, a
  torchvision ResNet-50 grid -> Linear -> ``GPT2LMHeadModel.generate(encoder_hidden_states=...)``;
- ``vit_gpt2`` (b): transformers' ``VisionEncoderDecoderModel`` with ViT-B/16 and GPT-2 small
  (random init), ``ViTImageProcessor`` and ``generate``: the shape of the most downloaded
  captioning checkpoint.

mmcap in fp32 must give exactly the naive pipeline's captions (asserted; also timed, as
``mmcap_fp32``). The systems take turns batch by batch and every batch counts with its best time
over the rounds, so that load from other processes hits all systems alike; ``others_cpu`` says
how many cores other processes used meanwhile (on a shared machine, trust runs where it is ~0).
``peak_rss_mb`` is the process's peak resident memory while mmcap captions (model included),
before the other systems are built. ``machine_fraction`` = mmcap's FLOPs per caption (counted
with torch.utils.flop_counter) x its captions/s / the bf16 matmul FLOP/s measured in the run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*attention_mask.*")

from mmcap import Captioner  # noqa: E402
from mmcap.captioner import compute_dtype  # noqa: E402
from mmcap.images import eval_transform  # noqa: E402
from mmcap.tokenizer import CaptionTokenizer  # noqa: E402

VOCAB, BEAMS, NEW_TOKENS, IMAGE_SIZE = 50257, 3, 20, 224
GENERATION = dict(num_beams=BEAMS, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS)


# ----------------------------------------------------------------------------- inputs and models
def make_photos(folder: Path, n: int, size=(640, 480), seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields, a few shapes and sensor-like noise, quality 90."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(3, 8))):
            x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
            r = int(rng.integers(20, 160))
            box = [int(x - r), int(y - r * rng.uniform(0.5, 1.5)), int(x + r), int(y + r)]
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        pixels = np.asarray(im, dtype=np.float32) + rng.normal(0, 8, (size[1], size[0], 3))
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


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
    vocab["<|endoftext|>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    special = "<|endoftext|>"
    return CaptionTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                                    unk_token=special))


def build_mmcap(tokenizer: CaptionTokenizer) -> Captioner:
    torch.manual_seed(0)
    cfg = {
        "encoder": {"arch": "resnet50"},
        "projection": {"kind": "linear", "max_grid": 16},
        "decoder": {"family": "gpt2", "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                    "max_positions": 1024, "dropout": 0.1},
        "image_size": IMAGE_SIZE,
        "max_caption_tokens": NEW_TOKENS,
    }
    return Captioner.from_config(cfg, tokenizer=tokenizer).eval()


class NaivePipeline:
    """(a) mmcap's architecture and weights, written the obvious way in fp32."""

    def __init__(self, model: Captioner):
        import torchvision
        from transformers import GPT2LMHeadModel

        resnet = torchvision.models.resnet50()
        missing, _ = resnet.load_state_dict(model.encoder.torchvision_state_dict(), strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"}, missing
        self.backbone = torch.nn.Sequential(*list(resnet.children())[:-2]).eval()  # grid, no pooling
        proj = model.projection
        self.linear, self.norm = copy.deepcopy(proj.proj), copy.deepcopy(proj.norm)
        self.row_embed, self.col_embed = proj.row_embed.detach().clone(), proj.col_embed.detach().clone()
        self.gpt2 = GPT2LMHeadModel(model.decoder.config).eval()
        self.gpt2.load_state_dict(model.decoder.state_dict())
        self.transform = eval_transform(IMAGE_SIZE)  # the same pixels as mmcap's reference path
        self.tokenizer = model.tokenizer.hf
        self.bos, self.eos = model.tokenizer.bos_id, model.tokenizer.eos_id

    @torch.no_grad()
    def caption(self, paths, batch_size: int) -> list[str]:
        out = []
        for start in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
            pixels = torch.stack([self.transform(im) for im in images])
            grid = self.backbone(pixels)  # [B, 2048, 7, 7]
            b, _, h, w = grid.shape
            memory = self.norm(self.linear(grid.flatten(2).transpose(1, 2)))
            memory = memory + (self.row_embed[:h, None] + self.col_embed[None, :w]).reshape(h * w, -1)
            ids = self.gpt2.generate(
                input_ids=torch.full((b, 1), self.bos), attention_mask=torch.ones(b, 1, dtype=torch.long),
                encoder_hidden_states=memory, do_sample=False, bos_token_id=self.bos, eos_token_id=self.eos,
                pad_token_id=self.eos, **GENERATION,
            )
            out += [self.tokenizer.decode(row[1:], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
                    for row in ids]
        return out


class VitGpt2Pipeline:
    """(b) transformers' VisionEncoderDecoderModel: ViT-B/16 + GPT-2 small, random init."""

    def __init__(self, tokenizer: CaptionTokenizer):
        from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                                  VisionEncoderDecoderModel)

        torch.manual_seed(1)
        special = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        decoder = GPT2Config(vocab_size=VOCAB, add_cross_attention=True, is_decoder=True, **special)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), decoder)
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id
        self.model = VisionEncoderDecoderModel(config=cfg).eval()
        self.processor = ViTImageProcessor()
        self.tokenizer = tokenizer.hf

    @torch.no_grad()
    def caption(self, paths, batch_size: int) -> list[str]:
        out = []
        for start in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
            pixels = self.processor(images=images, return_tensors="pt").pixel_values
            ids = self.model.generate(pixels, do_sample=False, **GENERATION)
            out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return out


# ----------------------------------------------------------------------------- measuring
class CpuShare:
    """Cores used by *other* processes between `start()` and `stop()` (from /proc/stat)."""

    def __init__(self):
        self.samples: list[float] = []

    @staticmethod
    def _read() -> tuple[float, float, float]:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0.0, 0.0, time.perf_counter()
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, in clock ticks
        mine = sum(os.times()[:4])
        return busy / os.sysconf("SC_CLK_TCK"), mine, time.perf_counter()

    def start(self) -> None:
        self._t0 = self._read()

    def stop(self) -> None:
        busy, mine, now = self._read()
        b0, m0, t0 = self._t0
        self.samples.append(max(0.0, (busy - b0) - (mine - m0)) / max(now - t0, 1e-9))

    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else 0.0


def bf16_matmul_flops(size: int = 2048, reps: int = 10) -> float:
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def flops_per_caption(model: Captioner, paths, batch_size: int) -> float:
    """FLOPs (matmuls, convolutions, attention) mmcap executes per caption for one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    pixels, _ = model.preprocess(paths[:batch_size])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.generate(pixels, **GENERATION)
    return counter.get_total_flops() / len(pixels)


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- main benchmark
def run(args) -> dict:
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    paths = [str(p) for p in make_photos(Path(tempfile.mkdtemp(prefix="mmcap-bench-")), args.n)]
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    precision = args.precision

    model = build_mmcap(stand_in_tokenizer())
    systems = {
        "mmcap": lambda batch: model.caption(batch, batch_size=args.batch_size, precision=precision, **GENERATION),
        "mmcap_fp32": lambda batch: model.caption(batch, batch_size=args.batch_size, precision="fp32", **GENERATION),
    }
    # mmcap alone first, for its peak memory while captioning (model resident + working memory)
    systems["mmcap"](batches[0])
    reset_peak_rss()
    for batch in batches:
        systems["mmcap"](batch)
    rss_mmcap = peak_rss_mb()
    log(f"mmcap ({compute_dtype(precision)}): peak RSS while captioning {rss_mmcap:.0f} MB")

    naive = NaivePipeline(model)
    vit = VitGpt2Pipeline(model.tokenizer)
    systems["naive"] = lambda batch: naive.caption(batch, args.batch_size)
    systems["vit_gpt2"] = lambda batch: vit.caption(batch, args.batch_size)
    for name in ("mmcap_fp32", "naive", "vit_gpt2"):
        systems[name](batches[0])  # warm-up

    # Systems take turns batch by batch, so that load from other processes hits them alike;
    # each batch counts with its best time over the rounds.
    share = CpuShare()
    best: dict[str, list[float]] = {name: [float("inf")] * len(batches) for name in systems}
    outputs: dict[str, list[list[str]]] = {name: [[] for _ in batches] for name in systems}
    order = list(systems)
    for r in range(args.rounds):
        for j, batch in enumerate(batches):
            turn = (r * len(batches) + j) % len(order)
            for name in order[turn:] + order[:turn]:
                share.start()
                t0 = time.perf_counter()
                outputs[name][j] = systems[name](batch)
                best[name][j] = min(best[name][j], time.perf_counter() - t0)
                share.stop()
        log(f"round {r}: " + ", ".join(f"{name} {args.n / sum(best[name]):.2f}" for name in order) + " captions/s")

    flat = {name: [c for chunk in out for c in chunk] for name, out in outputs.items()}
    mismatches = [i for i, (a, b) in enumerate(zip(flat["mmcap_fp32"], flat["naive"])) if a != b]
    assert not mismatches, f"mmcap fp32 captions differ from the naive pipeline's at images {mismatches[:10]}"
    assert len(flat["naive"]) == args.n

    rate = {name: args.n / sum(times) for name, times in best.items()}
    flops = flops_per_caption(model, paths, args.batch_size)
    peak = max(bf16_matmul_flops() for _ in range(2))
    return {
        "mmcap": round(rate["mmcap"], 3),
        "naive": round(rate["naive"], 3),
        "vit_gpt2": round(rate["vit_gpt2"], 3),
        "mmcap_over_naive": round(rate["mmcap"] / rate["naive"], 2),
        "mmcap_over_vit_gpt2": round(rate["mmcap"] / rate["vit_gpt2"], 2),
        "peak_rss_mb": round(rss_mmcap),
        "machine_fraction": round(flops * rate["mmcap"] / peak, 4),
        "mmcap_fp32": round(rate["mmcap_fp32"], 3),
        "mmcap_fp32_equals_naive": not mismatches,
        "precision": str(compute_dtype(precision)).replace("torch.", ""),
        "gflops_per_caption": round(flops / 1e9, 2),
        "bf16_matmul_gflops": round(peak / 1e9, 1),
        "others_cpu": round(share.mean(), 2),
        "n": args.n,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="number of JPEG files to caption (default 48)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="timed passes per system; the best one counts")
    p.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"], help="mmcap's precision")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--levers", action="store_true", help="also measure each speed lever on its own")
    p.add_argument("--compile", action="store_true", help="with --levers: also time torch.compile (slow to build)")
    p.add_argument("--quality", metavar="MODEL", help="instead: CIDEr of bf16 vs fp32 for a trained model")
    p.add_argument("--data", help="with --quality: test shards (glob or brace pattern)")
    p.add_argument("--num-beams", type=int, default=BEAMS, help="with --quality: beams")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quality:
        from precision_check import quality_check

        result = quality_check(args.quality, args.data, num_beams=args.num_beams)
        print(json.dumps(result))
        return 0 if result["within_1_percent"] else 1
    if args.levers:
        from levers import lever_table

        lever_table(args, sys.modules[__name__])
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
