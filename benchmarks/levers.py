"""What each speed lever gives on its own: `python benchmarks/bench_caption.py --levers [--compile]`.

Each row times one stage of captioning one batch (16 photos, beam 3, 20 new tokens) with the
real-size model, best of a few repeats; rows of a group differ in one lever only. Printed as a
table on stderr and returned as a dict. Two clocks: wall time, and the CPU time of this process,
which load from other processes barely moves when torch runs one thread (`--threads 1`).
"""
from __future__ import annotations

import copy
import io
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import mmcap.generation as generation
from mmcap.generation import GenerationConfig, generate
from mmcap.images import eval_transform, open_image


def best_time(fn, repeats: int = 3) -> tuple[float, float]:
    """Best wall and best CPU seconds of `fn` over `repeats` calls after a warm-up."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


@contextmanager
def patched(obj, name, value):
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


def _sdpa(q, keys_t, values, scale):
    return F.scaled_dot_product_attention(q, keys_t.transpose(-1, -2), values, scale=scale)


class _StubDecoder:
    """Returns fixed logits instantly: what is left is the beam search's own bookkeeping."""

    attentions = False

    def __init__(self, logits, memory):
        self.logits, self.memory = logits, memory

    def __call__(self, seqs):
        return self.logits[: seqs.shape[0]], None

    def expand(self, k):
        pass

    def reorder(self, rows):
        pass


def lever_table(args, bench) -> dict:
    rows: list[tuple[str, str, float, float]] = []

    def row(group, name, times):
        rows.append((group, name, *times))
        print(f"  {group:8s} {name:64s} {times[0]:8.3f} s wall {times[1]:8.3f} s cpu", file=sys.stderr, flush=True)

    import tempfile

    paths = [str(p) for p in bench.make_photos(Path(tempfile.mkdtemp(prefix="mmcap-levers-")), args.batch_size)]
    model = bench.build_mmcap(bench.stand_in_tokenizer())
    tok, size, n = model.tokenizer, model.config.image_size, len(paths)
    gen = GenerationConfig.from_kwargs(**bench.GENERATION)
    print(f"levers (batch {n}, {torch.get_num_threads()} threads):", file=sys.stderr)

    # --- image decoding: file -> normalised 224 px tensor, per batch
    transform = eval_transform(size)
    datas = [Path(p).read_bytes() for p in paths]
    from torchvision.io import decode_jpeg

    def pil():
        return [transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]

    def tv():
        return [_tv_transform(transform, decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8))) for d in datas]

    def draft():
        return [transform(open_image(d, min_size=size)) for d in datas]

    assert all(torch.equal(a, b) for a, b in zip(pil(), tv())), "decode_jpeg should give PIL's pixels"
    row("decode", "PIL decode + torchvision transforms", best_time(pil))
    row("decode", "torchvision.io.decode_jpeg (same pixels)", best_time(tv))
    row("decode", "PIL draft (DCT-domain downscale to >= 224 px)", best_time(draft))

    # --- encoder: pixels -> image tokens
    pixels = torch.stack(pil())
    cl = pixels.contiguous(memory_format=torch.channels_last)
    enc_cl = copy.deepcopy(model.encoder).to(memory_format=torch.channels_last)
    with torch.no_grad():
        row("encoder", "fp32 NCHW", best_time(lambda: model.encoder(pixels)))
        row("encoder", "fp32 channels_last", best_time(lambda: enc_cl(cl)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            row("encoder", "bf16 autocast, channels_last input (mmcap bf16)", best_time(lambda: model.encoder(cl)))
            row("encoder", "bf16 autocast, channels_last input and weights", best_time(lambda: enc_cl(cl)))
        memory = model.encode(pixels)

    # --- decoder: image tokens -> 16 x beam 3 x 20 tokens
    naive = bench.NaivePipeline(model)
    b = memory.shape[0]

    def hf_generate(**kw):
        return naive.gpt2.generate(input_ids=torch.full((b, 1), tok.bos_id), attention_mask=torch.ones(b, 1, dtype=torch.long),
                                   encoder_hidden_states=memory, do_sample=False, bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **bench.GENERATION, **kw)

    def ours(decoder=model.decoder, mem=memory):
        return generate(decoder, mem, tok.bos_id, tok.eos_id, tok.pad_id, gen)

    def bf16(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()
        return run

    with torch.no_grad():
        row("decoder", "transformers generate, fp32 (naive)", best_time(hf_generate, 1))
        try:
            row("decoder", "transformers generate + StaticCache, fp32", best_time(lambda: hf_generate(cache_implementation="static"), 1))
        except Exception as e:  # noqa: BLE001 - a lever that does not apply is reported, not fatal
            print(f"  decoder    transformers StaticCache: not usable here ({type(e).__name__}: {str(e)[:80]})", file=sys.stderr)
        with patched(generation._GPT2Decoder, "supports", staticmethod(lambda m, a: False)):
            row("decoder", "mmcap, transformers forward: 1 pass/image, K/V once, fp32", best_time(ours, 1))
            row("decoder", "  + bf16 autocast", best_time(bf16(ours), 2))
        row("decoder", "mmcap GPT-2 path (preallocated cache, shared image K/V), fp32", best_time(ours, 1))
        row("decoder", "  + bf16 autocast (mmcap bf16)", best_time(bf16(ours)))
        with patched(generation, "_attend", _sdpa):
            row("decoder", "  bf16, fused SDPA kernel instead of matmul attention", best_time(bf16(ours)))
        dec16 = copy.deepcopy(model.decoder).to(torch.bfloat16)
        row("decoder", "  bf16 weights instead of autocast", best_time(lambda: ours(dec16, memory.bfloat16())))
        del dec16

        # beam search bookkeeping alone: a decoder that answers instantly
        logits = torch.randn(b * 3, len(tok))
        stub = lambda: generation._beam_search(_StubDecoder(logits, memory), b, tok.bos_id, tok.eos_id, tok.pad_id, gen)  # noqa: E731
        row("decoder", "beam search bookkeeping only (stub decoder), 20 steps", best_time(stub))

    # --- end to end: files -> strings
    caption = lambda **kw: model.caption(paths, batch_size=n, precision="auto", **bench.GENERATION, **kw)  # noqa: E731
    threads = torch.get_num_threads()
    row("end2end", f"mmcap auto precision, {threads} threads", best_time(caption, 2))
    if threads > 1:
        torch.set_num_threads(1)
        row("end2end", "mmcap auto precision, 1 thread", best_time(caption, 1))
        torch.set_num_threads(threads)
    row("end2end", "mmcap, decode overlapped in a DataLoader worker", best_time(lambda: _overlapped(model, paths, args.batch_size), 2))

    if args.compile:
        _compile_rows(model, memory, cl, ours, bf16, row)
    return {f"{g}: {name.strip()}": {"wall_s": round(w, 3), "cpu_s": round(c, 3)} for g, name, w, c in rows}


def _tv_transform(transform, uint8_chw):
    """eval_transform minus its PIL-to-tensor step, for a decoded uint8 tensor."""
    for step in transform.transforms[1:]:
        uint8_chw = step(uint8_chw)
    return uint8_chw


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size
        self.transform = eval_transform(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i], min_size=self.size))


def _overlapped(model, paths, batch_size):
    loader = torch.utils.data.DataLoader(_Files(paths, model.config.image_size), batch_size=batch_size, num_workers=1)
    from bench_caption import GENERATION

    return [c for pixels in loader for c in model.caption(pixels, batch_size=batch_size, precision="auto", **GENERATION)]


def _compile_rows(model, memory, cl, ours, bf16, row):
    """torch.compile of the encoder (static shapes) and of the GPT-2 decoding step (dynamic length)."""
    import torch._inductor.config as inductor

    inductor.freezing = True  # constant weights: lets inductor prepack them for oneDNN
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        encoder = torch.compile(copy.deepcopy(model.encoder).to(memory_format=torch.channels_last))
        t0 = time.perf_counter()
        encoder(cl)
        print(f"  (encoder compile: {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        row("compile", "encoder bf16 channels_last, torch.compile", best_time(lambda: encoder(cl)))
    step = torch.compile(generation._GPT2Decoder.__call__, dynamic=True)
    with torch.no_grad(), patched(generation._GPT2Decoder, "__call__", step):
        t0 = time.perf_counter()
        bf16(ours)()
        print(f"  (decoder compile: {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        row("compile", "mmcap GPT-2 path bf16, torch.compile'd step", best_time(bf16(ours)))
