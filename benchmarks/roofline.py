"""The machine's limit for a captioner: roofline captions/s = 1 / max(FLOPs / peak, bytes / bandwidth).

- `matmul_rates`: GFLOP/s (GOP/s for int8) of square matmuls in each dtype mmcap computes in;
  the peak is the fastest among those the measured mode uses;
- `triad_bandwidth`: GB/s of a 2-thread triad `a = b + s * c` (torch.add with `out=`) on fp32
  arrays of at least 4x the last-level cache each, counting 3 arrays moved (STREAM's convention);
- `bytes_per_caption`: the memory traffic one caption needs at the least, counted from the model's
  shapes in the dtypes the mode stores them in (below);
- `roofline`: the figures above combined, plus `roofline_fraction` = measured / roofline.

What `bytes_per_caption` counts (a lower bound: traffic any implementation must make):
- the encoder's weights once per batch, and each convolution's output written once and read once;
- per decoding step, every decoder weight read once for the whole batch (48 rows at batch 16,
  beam 3): linear layers and the LM head at the mode's weight bytes (int8: 1), the rest as stored;
- per step and row, the self-attention cache read (2 x layers x length x width) and the new
  entry written; the image keys and values read once per image (beams share them), in their own
  dtype (int8 with a fp32 scale per key channel and per value row, in the int8 plan's kernels);
- per step and row, the logits written and read once in fp32.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mmcap.accel.timing import time_calls

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}
# Linear layers that project the image into keys and values: run once per image, not per step
# (GPT-2's cross-attention `crossattention.c_attn`).
IMAGE_KV_PROJECTIONS = ("crossattention.c_attn",)


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 << 20)


def triad_bandwidth(repeats: int = 5, max_array_bytes: int = 3 << 30) -> dict:
    """Best GB/s of `a = b + 3 c` on torch's threads, arrays of 4x the last-level cache (capped
    at `max_array_bytes` each, for machines whose reported cache is a whole host's)."""
    llc = last_level_cache_bytes()
    array_bytes = min(4 * llc, max_array_bytes)
    n = array_bytes // 4
    b, c = torch.rand(n), torch.rand(n)
    a = torch.empty(n)
    torch.add(b, c, alpha=3.0, out=a)  # page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t0)
    del a, b, c
    return {"triad_gb_per_s": round(3 * n * 4 / best / 1e9, 2), "triad_array_mib": round(array_bytes / 2**20),
            "last_level_cache_mib": round(llc / 2**20, 1), "triad_threads": torch.get_num_threads(),
            "triad_capped": array_bytes < 4 * llc}


def matmul_rates(size: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of four `size`^2 matmuls in a row: fp32, bf16, and int8 (`torch._int_mm`) where it runs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    pairs = {"fp32": (torch.mm, a, b), "bf16": (torch.mm, a.bfloat16(), b.bfloat16())}
    if hasattr(torch, "_int_mm"):
        pairs["int8"] = (torch._int_mm, torch.randint(-128, 127, (size, size), dtype=torch.int8),
                         torch.randint(-128, 127, (size, size), dtype=torch.int8))

    def four(fn, x, y):
        for _ in range(4):
            fn(x, y)

    calls = {}
    for name, (fn, x, y) in pairs.items():
        try:
            fn(x, y)
            calls[name] = lambda fn=fn, x=x, y=y: four(fn, x, y)
        except RuntimeError:  # no int8 matmul on this build/CPU
            pass
    seconds = time_calls(calls, repeats)
    return {name: 4 * 2 * size**3 / s / 1e9 for name, s in seconds.items()}


def _linear_weight_numel(module: nn.Module) -> tuple[int, int]:
    """(elements in the weights of linear layers (nn.Linear, GPT-2's Conv1D; a tied LM head
    counts here), other parameter elements but embedding tables)."""
    linear = other = 0
    for m in module.modules():
        own = dict(m.named_parameters(recurse=False))
        w = own.get("weight")
        if w is not None and w.ndim == 2 and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
            linear += w.numel()
            other += sum(p.numel() for n, p in own.items() if n != "weight")
        elif not isinstance(m, nn.Embedding):  # a lookup reads a few rows, not the table
            other += sum(p.numel() for p in own.values())
    return linear, other


def encoder_traffic(encoder: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    """(convolution output elements per image, grid positions): one forward with hooks."""
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].numel()))
             for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            grid = encoder(pixels[:1])
    finally:
        for h in hooks:
            h.remove()
    grid = grid[0] if isinstance(grid, (tuple, list)) else grid
    positions = grid.shape[-1] * grid.shape[-2] if grid.ndim == 4 else grid.shape[1]
    return sum(outputs), positions


def bytes_per_caption(*, encoder: nn.Module, decoder: nn.Module, pixels: torch.Tensor, batch_size: int,
                      beams: int, new_tokens: int, layers: int, width: int, vocab: int,
                      weight_dtype: str, encoder_dtype: str, cache_dtype: str, image_dtype: Optional[str] = None,
                      heads: int = 1) -> dict:
    """The least memory traffic of one caption, split by kind (module docstring); the image's keys
    and values in `image_dtype` (default `cache_dtype`); int8 caches and image keys and values add
    their scales (`heads` per layer)."""
    eb, wb, cb = DTYPE_BYTES[encoder_dtype], DTYPE_BYTES[weight_dtype], DTYPE_BYTES[cache_dtype]
    ib = DTYPE_BYTES[image_dtype or cache_dtype]
    enc_lin, enc_other = _linear_weight_numel(encoder)
    conv_out, positions = encoder_traffic(encoder, pixels)
    encoder_bytes = (enc_lin + enc_other) * eb / batch_size + 2 * conv_out * eb
    dec_lin, dec_other = _linear_weight_numel(decoder)
    image_kv = sum(m.weight.numel() for name, m in decoder.named_modules() if name.endswith(IMAGE_KV_PROJECTIONS))
    step_weights = (dec_lin - image_kv) * wb + dec_other * 4  # norms and biases stay fp32
    encoder_bytes += image_kv * wb / batch_size  # the image's keys and values: projected once per image
    cache = image = logits = 0.0
    for t in range(1, new_tokens + 1):  # per caption, summed over the steps
        cache += beams * layers * 2 * width * cb * (t + 1)  # read t entries, write 1
        if cache_dtype == "int8":  # a scale per key and value vector (each head, position)
            cache += beams * layers * 2 * heads * 4 * (t + 1)
        image += layers * 2 * positions * width * ib
        if image_dtype == "int8":  # a scale per key channel and per value row (position), each head
            image += layers * heads * (width // heads + positions) * 4
        logits += beams * vocab * 4 * 2
    weights = step_weights * new_tokens / batch_size
    total = encoder_bytes + weights + cache + image + logits
    return {
        "bytes_per_caption": total, "encoder_bytes": encoder_bytes, "decoder_weight_bytes": weights,
        "cache_bytes": cache + image, "logit_bytes": logits, "grid_positions": positions,
        "decoder_bytes_per_step": step_weights + (cache + image + logits) * batch_size / new_tokens,
        "decoder_weight_bytes_per_step": step_weights,
    }


def roofline(flops: float, traffic: float, peak_flops: float, bandwidth: float, measured: float) -> dict:
    """Roofline captions/s and how much of it `measured` captions/s reaches."""
    compute_s, memory_s = flops / peak_flops, traffic / bandwidth
    limit = 1.0 / max(compute_s, memory_s)
    return {"roofline_captions_per_s": round(limit, 2), "roofline_bound": "memory" if memory_s > compute_s else "compute",
            "roofline_fraction": round(measured / limit, 4)}


if __name__ == "__main__":  # the machine's side alone
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(triad_bandwidth(), {k: round(v, 1) for k, v in matmul_rates().items()})
