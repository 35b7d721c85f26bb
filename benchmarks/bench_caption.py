"""Captions per second, end to end (JPEG files in, strings out), for a captioner of real size.

    python benchmarks/bench_caption.py                 # one JSON line (about 3-5 minutes on 2 cores)
    python benchmarks/bench_caption.py --levers        # adds what each speed lever gives (table + JSON)
    python benchmarks/bench_caption.py --quality runs/demo/model --data 'data/demo/test-*.tar'   # fp32 vs bf16, int8

The model (`models.build_mmcap`): ResNet-50 at 224 px, a linear projection and a decoder of
GPT-2 small's shape (12 layers, width 768, 12 heads, vocabulary 50,257) with random weights and a
stand-in word-level tokenizer, since nothing can be downloaded. Every system decodes with beam 3
and exactly 20 new tokens, batch 16, over JPEG photos (640x480) written here, all in one process:

- ``mmcap``: ``Captioner.caption(paths, precision="int8")``, mmcap's fastest documented mode whose
  CIDEr-D stays within 1 % of fp32's on the demo test splits (``--quality``): the encoder as
  ``auto`` (bf16 where bf16 matmuls measured faster than fp32 on this machine: ``mmcap.accel.precision``;
  ``bf16_matmul_speedup`` says by how much), the decoder's linear layers and LM head in int8.
  ``precision`` and ``encoder_dtype`` in the output say which mode ran, ``encoder_runner`` and
  ``int8_engines`` what int8 measured fastest on this machine (torch's float or int8 twin, or ONNX
  Runtime, for the encoder; fbgemm or oneDNN per weight shape), ``int8_attention`` whether GPT-2's
  attention ran in mmcap's C++ kernels or torch's ops (timed); ``--precision`` picks another;
- ``naive`` (a): the same weights run the obvious way (``reference.NaivePipeline``): fp32, PIL +
  torchvision transforms, a torchvision ResNet-50 grid -> Linear ->
  ``GPT2LMHeadModel.generate(encoder_hidden_states=...)``;
- ``vit_gpt2`` (b): transformers' ``VisionEncoderDecoderModel`` with ViT-B/16 and GPT-2 small
  (random init), ``ViTImageProcessor`` and ``generate``: the shape of the most downloaded
  captioning checkpoint.

mmcap in fp32 must give exactly the naive pipeline's captions (asserted; also timed, as
``mmcap_fp32``). The systems take turns batch by batch and every batch counts with its best time
over the rounds, so that load from other processes hits all systems alike; ``others_cpu`` says
how many cores other processes used meanwhile (on a shared machine, trust runs where it is ~0).
``peak_rss_mb`` is the process's peak resident memory while mmcap captions (model included),
before the other systems are built. ``machine_fraction`` = mmcap's FLOPs per caption (counted
with torch.utils.flop_counter) x its captions/s / the peak matmul FLOP/s measured in the run;
``roofline_fraction`` = its captions/s / the roofline's (``roofline.py``: 1 / max(FLOPs / peak,
bytes / triad bandwidth)), with the bytes per caption and the decoder's bytes per step it counts.
``cpu_model`` and ``cpu_flags`` name the processor (AMX, VNNI, AVX-512 BF16).

``--quality MODEL --data SHARDS`` instead compares caption quality: CIDEr-D of a trained model's
fp32, bf16 and int8 captions, and the share of fast captions identical to fp32's; the exit status
is 1 when a fast mode's CIDEr-D is not within 1 % of fp32's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*attention_mask.*")

from measure import emit, log, peak_rss_mb, reset_peak_rss  # noqa: E402
from models import BEAMS, GENERATION, NEW_TOKENS, build_mmcap  # noqa: E402
from photos import make_photos  # noqa: E402
from reference import NaivePipeline, VitGpt2Pipeline  # noqa: E402
from roofline import bytes_per_caption, matmul_rates, roofline, triad_bandwidth  # noqa: E402

from mmcap import Captioner  # noqa: E402
from mmcap.accel.kernel_attention import kernels_faster  # noqa: E402
from mmcap.accel.plan import as_plan  # noqa: E402
from mmcap.accel.precision import compute_dtype, cpu_bf16_speedup  # noqa: E402
from mmcap.accel.timing import OtherLoad, choices  # noqa: E402


# ----------------------------------------------------------------------------- measuring
class CpuShare:
    """Cores used by *other* processes between each `start()` and `stop()` (`timing.OtherLoad`)."""

    def __init__(self):
        self.samples: list[float] = []

    def start(self) -> None:
        self._load = OtherLoad()

    def stop(self) -> None:
        self.samples.append(self._load.cores())

    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else 0.0


def flops_per_caption(model: Captioner, paths, batch_size: int) -> float:
    """FLOPs (matmuls, convolutions, attention) mmcap executes per caption for one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    pixels, _ = model.preprocess(paths[:batch_size])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.generate(pixels, **GENERATION)
    return counter.get_total_flops() / len(pixels)


def machine_limit(model: Captioner, paths, batch_size: int, precision: str, flops: float, measured: float) -> dict:
    """The roofline (benchmarks/roofline.py) of `precision` on this machine, and how close `measured` is."""
    encoder_dtype = "bf16" if compute_dtype(precision) == torch.bfloat16 else "fp32"
    weight_dtype = "int8" if precision == "int8" else encoder_dtype
    cfg = model.decoder.config
    heads = cfg.num_attention_heads
    # caches in the compute dtype; int8 where the int8 plan's kernels hold them and the image's keys and
    # values (`InferencePlan.cache_dtype`, `image_dtype`)
    cache_dtype = image_dtype = encoder_dtype
    plan = as_plan(precision)
    if plan.image_dtype == torch.int8 and kernels_faster(heads, cfg.hidden_size // heads, plan.cache_dtype):
        cache_dtype = image_dtype = "int8"
    rates = matmul_rates()
    used = {weight_dtype, encoder_dtype}
    peak = max(rate for dtype, rate in rates.items() if dtype in used) * 1e9
    bandwidth = triad_bandwidth()
    pixels, _ = model.preprocess(paths[:1])
    traffic = bytes_per_caption(
        encoder=model.encoder, decoder=model.decoder, pixels=pixels, batch_size=batch_size, beams=BEAMS,
        new_tokens=NEW_TOKENS, layers=cfg.num_hidden_layers, width=cfg.hidden_size, vocab=cfg.vocab_size,
        weight_dtype=weight_dtype, encoder_dtype=encoder_dtype, cache_dtype=cache_dtype, image_dtype=image_dtype,
        heads=heads)
    out = roofline(flops, traffic["bytes_per_caption"], peak, bandwidth["triad_gb_per_s"] * 1e9, measured)
    return {
        **out, "machine_fraction": round(flops * measured / peak, 4),
        "peak_matmul_gflops": round(peak / 1e9, 1), **{f"{k}_matmul_gflops": round(v, 1) for k, v in rates.items()},
        **bandwidth, "mb_per_caption": round(traffic["bytes_per_caption"] / 1e6, 1),
        "decoder_mb_per_step": round(traffic["decoder_bytes_per_step"] / 1e6, 1),
        "decoder_weight_mb_per_step": round(traffic["decoder_weight_bytes_per_step"] / 1e6, 1),
        "traffic_mb_per_caption": {k: round(traffic[k] / 1e6, 1) for k in
                                   ("encoder_bytes", "decoder_weight_bytes", "cache_bytes", "logit_bytes")},
    }


# ----------------------------------------------------------------------------- main benchmark
def run(args) -> dict:
    paths = [str(p) for p in make_photos(Path(tempfile.mkdtemp(prefix="mmcap-bench-")), args.n)]
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    precision = args.precision

    model = build_mmcap()
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
    systems["naive"] = lambda batch: naive.caption(batch, args.batch_size, **GENERATION)
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
    limit = machine_limit(model, paths, args.batch_size, precision, flops, rate["mmcap"])
    return {
        "mmcap": round(rate["mmcap"], 3),
        "naive": round(rate["naive"], 3),
        "vit_gpt2": round(rate["vit_gpt2"], 3),
        "mmcap_over_naive": round(rate["mmcap"] / rate["naive"], 2),
        "mmcap_over_vit_gpt2": round(rate["mmcap"] / rate["vit_gpt2"], 2),
        "peak_rss_mb": round(rss_mmcap),
        "roofline_fraction": limit.pop("roofline_fraction"),
        "machine_fraction": limit.pop("machine_fraction"),
        "mmcap_fp32": round(rate["mmcap_fp32"], 3),
        "mmcap_fp32_equals_naive": not mismatches,
        "precision": precision,
        "encoder_dtype": str(compute_dtype(precision)).replace("torch.", ""),
        # what this process timed and chose: the encoder's runner (torch float or int8 twin, ONNX
        # Runtime), int8 engines per weight shape, GPT-2 attention (C++ kernels or torch's ops)
        "timed_choices": choices(),
        "bf16_matmul_speedup": round(cpu_bf16_speedup(), 2),
        "gflops_per_caption": round(flops / 1e9, 2),
        **limit,
        "others_cpu": round(share.mean(), 2),
        "n": args.n,
        "batch_size": args.batch_size,
    }


def quality_check(model_dir: str, data: str, num_beams: int = BEAMS, batch_size: int = 32,
                  modes: tuple[str, ...] = ("bf16", "int8")) -> dict:
    """CIDEr-D of `model_dir`'s fp32 captions of `data` and of each fast mode's, how much the fast
    captions agree with fp32's, and whether each stays within 1 % of fp32's CIDEr-D."""
    from mmcap.data.streams import iter_samples
    from mmcap.metrics import caption_metrics

    if not data:
        raise SystemExit("--quality needs --data (test shards)")
    model = Captioner.from_pretrained(model_dir)
    examples = list(iter_samples(data, min_image_size=model.config.image_size))
    if not examples:
        raise SystemExit(f"no usable samples in {data}")
    references = {ex.key: ex.captions for ex in examples}
    images = [ex.image for ex in examples]
    result: dict = {"model": str(model_dir), "images": len(examples), "num_beams": num_beams}
    captions = {}
    for precision in ("fp32", *modes):
        t0 = time.perf_counter()
        captions[precision] = model.caption(images, batch_size=batch_size, precision=precision, num_beams=num_beams)
        result[f"seconds_{precision}"] = round(time.perf_counter() - t0, 2)
        predictions = {ex.key: c for ex, c in zip(examples, captions[precision])}
        result[f"cider_{precision}"] = round(caption_metrics(references, predictions, meteor=False)["CIDEr"], 4)
    result["timed_choices"] = choices()  # the fast modes' encoder runner, int8 engines and attention, as timed
    for mode in modes:
        same = sum(a == b for a, b in zip(captions["fp32"], captions[mode]))
        result[f"same_captions_{mode}"] = round(same / len(examples), 4)
        change = (result[f"cider_{mode}"] - result["cider_fp32"]) / max(abs(result["cider_fp32"]), 1e-12)
        result[f"cider_relative_change_{mode}"] = round(change, 5)
        result[f"within_1_percent_{mode}"] = abs(change) <= 0.01
    result["within_1_percent"] = all(result[f"within_1_percent_{m}"] for m in modes)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="number of JPEG files to caption (default 48)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="timed passes per system; the best one counts")
    p.add_argument("--precision", default="int8", choices=["fp32", "bf16", "auto", "int8"],
                   help="mmcap's precision (the headline figure; int8 is the fastest whose demo CIDEr-D stays "
                        "within 1 %% of fp32's: see --quality)")
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
        result = emit(quality_check(args.quality, args.data, num_beams=args.num_beams))
        return 0 if result["within_1_percent"] else 1
    levers = {}
    if args.levers:
        from _caption_levers import lever_table

        levers = {"levers": lever_table(args.batch_size, compile=args.compile)}
    emit({**run(args), **levers})
    return 0


if __name__ == "__main__":
    sys.exit(main())
