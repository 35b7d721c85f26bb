"""GPU figures on one CUDA device: captions/s of bench_caption's model and settings, and training
samples/s and MFU of ResNet-50 + GPT-2 small. Prints one JSON line (the GPU and CPU named).

    python benchmarks/bench_gpu.py                      # about 3-4 minutes on an H200
    python benchmarks/bench_gpu.py --device cpu --n 8 --train-steps 2 --train-batch 2   # a smoke run

Captioning (`models.build_mmcap`: ResNet-50 at 224 px + a decoder of GPT-2 small's shape, random
weights, beam 3, exactly 20 new tokens) over photo-like 640x480 JPEG files, at batch 16 (as
bench_caption) and 64:

- ``mmcap_bf16`` / ``mmcap_fp32``: ``Captioner.caption(paths, precision=...)``: JPEG decoding in the
  calling thread, then the model;
- ``mmcap_stream_bf16``: ``Captioner.caption_stream`` with 8 DataLoader workers decoding while the
  GPU works (how a collection is captioned);
- ``model_bf16``: the model alone on pixels already on the GPU (the ceiling for the above);
- ``mmcap_bf16_graphs`` / ``model_bf16_graphs``: the same two with the decoding steps compiled
  (``InferencePlan.resolve("bf16", compile_decoder=True)``: CUDA graphs over a static cache, one
  launch per token); ``graphs_compile_s`` is the first call's extra time, ``graphs_same_as_bf16``
  the share of captions equal to eager bf16's; ``decode_{eager,graphs}_bN_*_per_token`` a batch's
  decoding (encoder included) per new token: host ms, GPU ms and kernel launches (a graph replay
  counts one; on a CPU aten operators instead); ``--skip-graphs`` leaves them out;
- ``naive`` and ``vit_gpt2``: bench_caption's two reference systems (fp32) on the same GPU.

``fp32_same_as_naive`` is the share of mmcap fp32 captions equal to the naive pipeline's (cuDNN
may pick different convolution algorithms, so exact equality is not asserted here as it is on CPU).

Training: the same model in train mode on synthetic batches (224 px images, 20-token captions),
bf16 autocast, fused AdamW, gradient clipping at 1.0; ``plain`` is a hand-written loop,
``lightning`` is `CaptionModule` under `L.Trainer(precision="bf16-mixed")` with the batches
coming from a DataLoader of pinned CPU tensors. FLOPs per sample are counted with
torch.utils.flop_counter over one forward + backward; ``mfu`` divides the achieved FLOP/s by
the GPU's dense bf16 peak (``--peak-tflops``, default the H200's 989); ``bf16_matmul_tflops`` is
the rate measured here on 8192x8192 matrices. Lightning runs at the first training batch size.
``mfu_means`` in the output says which MFU each key is. Per training batch size,
``host_ms_per_step`` (the step queued, no sync), ``gpu_ms_per_step`` (kernel time, torch.profiler)
and ``kernel_launches_per_step`` say whether a step is bound by the host or by the GPU
(`step_anatomy`; on a CPU, aten operators per step instead of launches).

``train_bN_compiled_*`` repeat the plain loop and Lightning with the loss through
``torch.compile(mode=--compile)`` (`model.training.compile` in a recipe), compile time apart
(``_compile_s``); ``--compile none`` skips them.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

from measure import emit, log  # noqa: E402
from models import GENERATION, IMAGE_SIZE, NEW_TOKENS, VOCAB, build_mmcap  # noqa: E402
from photos import make_photos  # noqa: E402
from reference import NaivePipeline, VitGpt2Pipeline  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 2) -> tuple[float, object]:
    """Best seconds of `fn()` over `repeats` calls after a warm-up call, and its last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


# ----------------------------------------------------------------------------- captioning
def captioning(model, paths: list[str], device: torch.device, batch_sizes: list[int], workers: int,
               references: bool = True, graphs: bool = True) -> dict:
    from mmcap.accel.plan import InferencePlan

    n = len(paths)
    out: dict = {}
    captions: dict = {}
    graphed = InferencePlan.resolve("bf16", device, compile_decoder=True) if graphs else None
    for b in batch_sizes:
        for precision in ("bf16", "fp32"):
            t, captions[(precision, b)] = timed(
                lambda: model.caption(paths, batch_size=b, precision=precision, **GENERATION), device)
            out[f"mmcap_{precision}_b{b}"] = round(n / t, 2)
            log(f"mmcap {precision} batch {b}: {n / t:.1f} captions/s")
        t, _ = timed(lambda: [r for r in model.caption_stream(paths, batch_size=b, num_workers=workers,
                                                               precision="bf16", **GENERATION)], device)
        out[f"mmcap_stream_bf16_b{b}"] = round(n / t, 2)
        pixels = [model.preprocess(paths[i : i + b])[0].to(device) for i in range(0, n, b)]

        def model_only():  # one autocast context for all batches, as `caption` opens: weights cast once
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return [model.generate(p, precision="bf16", **GENERATION) for p in pixels]

        t, _ = timed(model_only, device)
        out[f"model_bf16_b{b}"] = round(n / t, 2)
        log(f"stream {out[f'mmcap_stream_bf16_b{b}']}, model alone {out[f'model_bf16_b{b}']} captions/s")
        if graphs:
            out.update(graphed_captioning(model, paths, pixels, device, b, graphed, captions[("bf16", b)]))
    if not references:
        return out

    naive = NaivePipeline(model, device=device)
    vit = VitGpt2Pipeline(model.tokenizer, device=device)
    for b in batch_sizes:
        t, naive_captions = timed(lambda: naive.caption(paths, b, **GENERATION), device)
        out[f"naive_b{b}"] = round(n / t, 2)
        same = sum(a == c for a, c in zip(captions[("fp32", b)], naive_captions))
        out[f"fp32_same_as_naive_b{b}"] = round(same / n, 4)
    t, _ = timed(lambda: vit.caption(paths, batch_sizes[0]), device)
    out[f"vit_gpt2_b{batch_sizes[0]}"] = round(n / t, 2)
    b = batch_sizes[0]
    best_mmcap = max(out[f"mmcap_bf16_b{b}"], out[f"mmcap_stream_bf16_b{b}"], out.get(f"mmcap_bf16_graphs_b{b}", 0))
    out[f"mmcap_over_naive_b{b}"] = round(best_mmcap / out[f"naive_b{b}"], 2)
    out[f"mmcap_over_vit_gpt2_b{b}"] = round(best_mmcap / out[f"vit_gpt2_b{b}"], 2)
    return out


def graphed_captioning(model, paths: list[str], pixels: list[torch.Tensor], device: torch.device, b: int, plan,
                       eager: list[str]) -> dict:
    """`caption` and the model alone with the plan's compiled decoding steps (CUDA graphs on a GPU)."""
    n = len(paths)
    sync(device)
    t0 = time.perf_counter()
    model.caption(paths[:b], batch_size=b, precision=plan, **GENERATION)  # compiles (and records the graphs)
    sync(device)
    first = time.perf_counter() - t0
    t, got = timed(lambda: model.caption(paths, batch_size=b, precision=plan, **GENERATION), device)
    out = {f"mmcap_bf16_graphs_b{b}": round(n / t, 2), f"graphs_compile_s_b{b}": round(first - t * b / n, 1),
           f"graphs_same_as_bf16_b{b}": round(sum(a == c for a, c in zip(got, eager)) / n, 4)}

    def model_only():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return [model.generate(p, precision=plan, **GENERATION) for p in pixels]

    t, _ = timed(model_only, device)
    out[f"model_bf16_graphs_b{b}"] = round(n / t, 2)
    for name, how in (("eager", "bf16"), ("graphs", plan)):  # one batch's decoding, per new token
        def one_batch(how=how):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                model.generate(pixels[0], precision=how, **GENERATION)
        out.update({f"decode_{name}_b{b}_{k}": v for k, v in
                    anatomy(one_batch, device, repeats=2, per=NEW_TOKENS, unit="token").items()})
    log(f"mmcap bf16 with compiled steps, batch {b}: {out[f'mmcap_bf16_graphs_b{b}']} captions/s, model alone "
        f"{out[f'model_bf16_graphs_b{b}']} (compile {out[f'graphs_compile_s_b{b}']} s)")
    return out


# ----------------------------------------------------------------------------- training
def synthetic_batches(n_batches: int, batch: int, pin: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n_batches):
        pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        ids = torch.randint(0, VOCAB, (batch, NEW_TOKENS + 1), generator=g)
        item = {"pixels": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                "keys": [f"{i}_{j}" for j in range(batch)]}
        if pin:
            item = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in item.items()}
        batches.append(item)
    return batches


def train_flops_per_sample(model, batch: dict, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    pixels = batch["pixels"].to(device).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(pixels, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(pixels)


def train_step(model, batch: dict, device: torch.device, optimizer) -> None:
    """One step of the plain loop: bf16 autocast, backward, clipping at 1.0, AdamW."""
    pixels = batch["pixels"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(pixels, batch["input_ids"].to(device, non_blocking=True),
                     batch["attention_mask"].to(device, non_blocking=True))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_training(model, batches: list[dict], device: torch.device, warmup: int) -> float:
    """Samples/s of a hand-written bf16-autocast loop over `batches` (the first `warmup` untimed)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    samples, t0 = 0, None
    for step, batch in enumerate(batches):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        train_step(model, batch, device, optimizer)
        if t0 is not None:
            samples += len(batch["pixels"])
    sync(device)
    return samples / (time.perf_counter() - t0)


def lightning_training(batches: list[dict], device: torch.device, warmup: int, compile_mode: str = "") -> float:
    """Samples/s of `CaptionModule` fitted by a Lightning Trainer (bf16-mixed) on `batches`;
    with `compile_mode`, its loss compiled (`model.training.compile: {mode: compile_mode}`)."""
    import lightning as L

    from mmcap.training.module import CaptionModule

    class Timer(L.Callback):
        def __init__(self):
            self.t0, self.t1, self.samples = None, None, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.t0 is not None:
                self.samples += len(batch["keys"])
            if batch_idx == len(batches) - 1:
                sync(device)
                self.t1 = time.perf_counter()

    captioner = build_mmcap()
    module = CaptionModule(captioner=captioner.config, optim={"lr": 1e-4, "warmup_steps": 0},
                           training={"channels_last": True,
                                     "compile": {"mode": compile_mode} if compile_mode else False})
    module.set_captioner(captioner)
    timer = Timer()
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=len(batches), gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        limit_val_batches=0, default_root_dir=tempfile.mkdtemp(prefix="mmcap-bench-gpu-"))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.samples / (timer.t1 - timer.t0)


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


def profile_step(model, batch: dict, device: torch.device, path: str) -> None:
    """The top operators of a few training steps by GPU time, written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            pixels = batch["pixels"].to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(pixels, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
    Path(path).write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30) + "\n" +
                          prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def step_anatomy(model, batch: dict, device: torch.device, steps: int = 5) -> dict:
    """Where a step of the plain loop goes: host ms (the wall time until the step is queued, no
    sync: the Python and dispatch side), GPU ms (the kernels' own time, torch.profiler) and kernel
    launches per step. A step is host-bound where host ms exceed GPU ms: the GPU waits for work.
    On a CPU: host ms and the aten operators dispatched per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return anatomy(lambda: train_step(model, batch, device, optimizer), device, steps)


def anatomy(fn, device: torch.device, repeats: int = 5, per: int = 1, unit: str = "step") -> dict:
    """`fn()`'s host ms (until its work is queued), GPU ms (torch.profiler) and kernel launches (a
    CUDA graph's replay counts one), each over `per` (the `unit`s one call makes); on a CPU host ms
    and aten operators."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    sync(device)
    host = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    stats, n = prof.key_averages(), repeats * per
    out = {f"host_ms_per_{unit}": round(1e3 * min(host) / per, 3)}
    if cuda:
        out[f"gpu_ms_per_{unit}"] = round(sum(e.self_device_time_total for e in stats) / 1e3 / n, 3)
        out[f"kernel_launches_per_{unit}"] = round(
            sum(e.count for e in stats if "LaunchKernel" in e.key or "GraphLaunch" in e.key) / n, 1)
    else:
        out[f"aten_ops_per_{unit}"] = round(sum(e.count for e in stats if e.key.startswith("aten::")) / n, 1)
    return out


def compiled_training(batch: int, batches: list[dict], device: torch.device, warmup: int, flops: float,
                      peak_tflops: float, mode: str, lightning: bool) -> dict:
    """The plain loop and CaptionModule with the loss through `torch.compile(mode=mode)` (the
    compile paid in the untimed warm-up steps): samples/s, MFU, a step's anatomy, Lightning's overhead."""
    model = build_mmcap().to(device).train()
    model.encoder.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, mode=mode)
    t0 = time.perf_counter()
    plain_training(compiled, batches[: warmup + 1], device, warmup)  # compiles (the first steps)
    compile_s = time.perf_counter() - t0
    plain = plain_training(compiled, batches, device, warmup)
    anatomy = step_anatomy(compiled, batches[0], device)
    log(f"plain loop compiled ({mode}), batch {batch}: {plain:.1f} samples/s, compiled in {compile_s:.0f} s; "
        f"a step's anatomy {anatomy}")
    key = f"train_b{batch}_compiled"
    out = {f"{key}_mode": mode, f"{key}_compile_s": round(compile_s, 1), f"{key}_plain_samples_per_s": round(plain, 1),
           f"{key}_mfu": round(flops * plain / (peak_tflops * 1e12), 4), **{f"{key}_{k}": v for k, v in anatomy.items()}}
    del model, compiled
    if lightning:
        rate = lightning_training(batches, device, warmup, compile_mode=mode)
        log(f"lightning compiled ({mode}), batch {batch}: {rate:.1f} samples/s")
        out[f"{key}_lightning_samples_per_s"] = round(rate, 1)
        out[f"{key}_lightning_overhead_pct"] = round(100 * (1 - rate / plain), 2)
        out[f"{key}_lightning_mfu"] = round(flops * rate / (peak_tflops * 1e12), 4)
    return out


def training(device: torch.device, batch: int, steps: int, warmup: int, peak_tflops: float,
             lightning: bool = True, profile_to: str = "", compile_mode: str = "") -> dict:
    model = build_mmcap().to(device).train()
    model.encoder.to(memory_format=torch.channels_last)
    batches = synthetic_batches(warmup + steps, batch, pin=device.type == "cuda")
    flops = train_flops_per_sample(model, batches[0], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plain = plain_training(model, batches, device, warmup)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    log(f"plain loop, batch {batch}: {plain:.1f} samples/s, {flops / 1e9:.1f} GFLOP per sample")
    if profile_to and device.type == "cuda":
        profile_step(model, batches[0], device, profile_to)
    anatomy = step_anatomy(model, batches[0], device)
    log(f"plain loop, batch {batch}: a step's anatomy {anatomy}")
    del model
    out = {
        f"train_b{batch}_plain_samples_per_s": round(plain, 1),
        f"train_b{batch}_peak_memory_gib": round(peak_mem, 2),
        f"train_b{batch}_mfu": round(flops * plain / (peak_tflops * 1e12), 4),
        "train_gflops_per_sample": round(flops / 1e9, 2),
        **{f"train_b{batch}_{k}": v for k, v in anatomy.items()},
    }
    if lightning:
        rate = lightning_training(batches, device, warmup)
        log(f"lightning, batch {batch}: {rate:.1f} samples/s")
        out[f"train_b{batch}_lightning_samples_per_s"] = round(rate, 1)
        out[f"train_b{batch}_lightning_overhead_pct"] = round(100 * (1 - rate / plain), 2)
        out[f"train_b{batch}_lightning_mfu"] = round(flops * rate / (peak_tflops * 1e12), 4)
    if compile_mode:
        out.update(compiled_training(batch, batches, device, warmup, flops, peak_tflops, compile_mode, lightning))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=256, help="JPEG files to caption")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers of the streaming path")
    p.add_argument("--train-batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--train-warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H200: 989)")
    p.add_argument("--skip-captioning", action="store_true")
    p.add_argument("--skip-references", action="store_true", help="time mmcap only (no naive, no ViT-GPT2)")
    p.add_argument("--skip-graphs", action="store_true", help="no captioning with compiled decoding steps")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--profile", default="", help="write the top GPU operators of a training step here")
    p.add_argument("--compile", default="default", metavar="MODE",
                   help="also train with the loss through torch.compile(mode=MODE) (default, reduce-overhead, "
                        "max-autotune, ...; 'none' to skip)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "mfu_means": ("train_bN_mfu: the plain loop's, train_bN_lightning_mfu: CaptionModule under "
                                  "L.Trainer (first batch size only); train_bN_compiled_*: the same with the loss "
                                  "through torch.compile; FLOPs per sample (forward + backward, "
                                  "flop_counter) x samples/s / peak_tflops"),
                    "torch": torch.__version__, "cudnn_benchmark": args.cudnn_benchmark, "peak_tflops": args.peak_tflops}
    if not args.skip_captioning:
        paths = [str(x) for x in make_photos(Path(tempfile.mkdtemp(prefix="mmcap-bench-gpu-")), args.n)]
        model = build_mmcap().to(device)
        result.update(captioning(model, paths, device, args.batch_sizes, args.workers, not args.skip_references,
                                 graphs=not args.skip_graphs))
        del model
    for i, batch in enumerate(args.train_batches):
        result.update(training(device, batch, args.train_steps, args.train_warmup, args.peak_tflops,
                               lightning=i == 0, profile_to=args.profile if i == 0 else "",
                               compile_mode="" if args.compile == "none" else args.compile))
    if device.type == "cuda":
        result["bf16_matmul_tflops"] = round(matmul_tflops(device), 1)
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
