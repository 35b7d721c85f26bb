"""What each speed lever gives on its own: `python benchmarks/bench_caption.py --levers [--compile]`.

A module of bench_caption's, not a script. Each row times one stage of captioning one batch (16
photos, beam 3, 20 new tokens) with bench_caption's real-size model, best of a few repeats; rows
of a group differ in one lever only. Printed as a table on stderr and returned as a dict (which
bench_caption adds to its JSON line). Two clocks: wall time, and the CPU time of this process,
which load from other processes barely moves when torch runs one thread (`--threads 1`).

Only public API is used: the transformers-forward path of `mmcap.generation.decode.generate` is reached
by handing it the decoder behind a plain module (`reference.TransformersForward`), beam-search
bookkeeping is timed with a decoder that answers instantly, and the attention kernels (mmcap's
matmul attention vs the fused SDPA) are timed on their own, on the shapes this decoding uses.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image

from measure import best_time, log
from models import GENERATION, build_mmcap
from photos import make_photos
from reference import NaivePipeline, TransformersForward
from mmcap.generation import GenerationConfig, generate
from mmcap.images import eval_transform, open_image
from mmcap.accel import int8_encoder, kernel_attention, quantize
from mmcap.accel import kernels as attention_kernel
from mmcap.generation.attention import attend
from mmcap.accel.folding import folded_encoder
from mmcap.accel.quantize import int8_linears


def lever_table(batch_size: int = 16, compile: bool = False) -> dict:
    rows: list[tuple[str, str, float, float]] = []

    def row(group, name, times):
        rows.append((group, name, *times))
        log(f"  {group:9s} {name:64s} {times[0]:8.3f} s wall {times[1]:8.3f} s cpu")

    paths = [str(p) for p in make_photos(Path(tempfile.mkdtemp(prefix="mmcap-levers-")), batch_size)]
    model = build_mmcap()
    tok, size, n = model.tokenizer, model.config.image_size, len(paths)
    gen = GenerationConfig.from_kwargs(**GENERATION)
    log(f"levers (batch {n}, {torch.get_num_threads()} threads):")

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
        # autocast opened per call, as each `caption` call does: its weight casts are part of the cost
        row("encoder", "bf16 autocast, channels_last input (mmcap bf16 in 0.2)", best_time(_bf16(lambda: model.encoder(cl))))
        row("encoder", "bf16 autocast, channels_last input and weights", best_time(_bf16(lambda: enc_cl(cl))))
        folded = folded_encoder(model.encoder, torch.bfloat16)
        cl16 = cl.bfloat16()
        row("encoder", "folded twin: BatchNorm in the convs, bf16 weights (mmcap bf16)", best_time(lambda: folded(cl16)))
        folded32 = folded_encoder(model.encoder, torch.float32)
        row("encoder", "folded twin, fp32 channels_last (bf16's counterpart where fp32 beats bf16)", best_time(lambda: folded32(cl)))
        int8_twin = int8_encoder.calibrate(model.encoder, pixels)
        row("encoder", "int8 twin: u8 x s8 convs, calibrated (mmcap int8, where timed fastest)", best_time(lambda: int8_twin(pixels)))
        _onnxruntime_rows(model.encoder, pixels, row)
        memory = model.encode(pixels)

    # --- decoder: image tokens -> 16 x beam 3 x 20 tokens
    naive = NaivePipeline(model)

    def hf_generate(**kw):
        return naive.generate(memory, **GENERATION, **kw)

    def ours(decoder=model.decoder, mem=memory, decode=generate):
        return decode(decoder, mem, tok.bos_id, tok.eos_id, tok.pad_id, gen)

    generic = TransformersForward(model.decoder)
    with torch.no_grad():
        row("decoder", "transformers generate, fp32 (naive)", best_time(hf_generate, 1))
        try:
            row("decoder", "transformers generate + StaticCache, fp32", best_time(lambda: hf_generate(cache_implementation="static"), 1))
        except Exception as e:  # noqa: BLE001 - a lever that does not apply is reported, not fatal
            log(f"  decoder   transformers StaticCache: not usable here ({type(e).__name__}: {str(e)[:80]})")
        row("decoder", "mmcap, transformers forward: 1 pass/image, K/V once, fp32", best_time(lambda: ours(generic), 1))
        row("decoder", "  + bf16 autocast", best_time(_bf16(lambda: ours(generic)), 2))
        row("decoder", "mmcap GPT-2 path (self-attention cache grown per step, shared image K/V), fp32", best_time(ours, 1))
        with _kernels_forced(False):
            row("decoder", "  + bf16 autocast, attention in torch's ops", best_time(_bf16(ours)))
            dec16 = copy.deepcopy(model.decoder).to(torch.bfloat16)
            row("decoder", "  bf16 weights instead of autocast", best_time(functools.partial(ours, dec16, memory.bfloat16())))
        with _kernels_forced(True):
            row("decoder", "  + bf16 autocast, attention in mmcap's C++ kernels (mmcap bf16, where timed faster)",
                best_time(_bf16(ours)))
        del dec16

        def int8():  # what precision="int8" decodes with: int8 linears and LM head, the rest fp32
            with int8_linears(model.decoder):
                return ours()

        with _engines_forced("fbgemm"):  # fresh twins, every weight shape on fbgemm (mmcap 0.2)
            row("decoder", "  int8 linear layers and LM head on fbgemm, rest fp32", best_time(int8))
        with _engines_forced(None):  # each weight shape on the engine that measured fastest
            row("decoder", "  int8, each weight shape on the engine measured fastest", best_time(int8))

        def int8_bf16_attention():  # what precision="int8" decodes with on a machine where bf16 is fast
            with int8_linears(model.decoder):
                return generate(model.decoder, memory, tok.bos_id, tok.eos_id, tok.pad_id, gen,
                                attention_dtype=torch.bfloat16)

        with _kernels_forced(False):
            row("decoder", "    + attention (caches, matmuls) in bf16, torch's ops", best_time(int8_bf16_attention))
        with _kernels_forced(True):
            row("decoder", "    + attention in mmcap's C++ kernels, bf16 caches (mmcap int8, where timed faster)",
                best_time(int8_bf16_attention))

        # beam search bookkeeping alone: generate() with a decoder that answers instantly
        b = memory.shape[0]
        instant = _InstantDecoder(torch.randn(b * gen.num_beams, len(tok)), model.decoder.config)
        stub_cfg = gen.updated(use_cache=False)
        stub = lambda: generate(instant, torch.zeros(b, 1, 1), tok.bos_id, tok.eos_id, tok.pad_id, stub_cfg)  # noqa: E731
        row("decoder", "beam search bookkeeping only (instant decoder), 20 steps", best_time(stub))

    # --- one decoder weight (GPT-2's MLP up-projection) at one step's rows, in each weight format
    _weight_format_rows(model.decoder.config.hidden_size, b * gen.num_beams, row)

    # --- the attention kernel of the GPT-2 path, alone: all calls of decoding this batch, bf16
    attention = _attention_calls(model.decoder.config, b, gen.num_beams, gen.max_new_tokens, memory.shape[1])
    torch.testing.assert_close(attention(attend), attention(_sdpa_attention), atol=0.05, rtol=0.05)
    row("attention", "matmul attention (mmcap's torch path), bf16, 20 steps x all layers", best_time(lambda: attention(attend)))
    row("attention", "  fused SDPA kernel instead", best_time(lambda: attention(_sdpa_attention)))

    # --- end to end: files -> strings
    caption = lambda **kw: model.caption(paths, batch_size=n, precision="auto", **GENERATION, **kw)  # noqa: E731
    threads = torch.get_num_threads()
    row("end2end", f"mmcap auto precision, {threads} threads", best_time(caption, 2))
    row("end2end", f"mmcap int8, {threads} threads",
        best_time(lambda: model.caption(paths, batch_size=n, precision="int8", **GENERATION), 2))
    if threads > 1:
        torch.set_num_threads(1)
        row("end2end", "mmcap auto precision, 1 thread", best_time(caption, 1))
        torch.set_num_threads(threads)
    row("end2end", "mmcap, decode overlapped in a DataLoader worker", best_time(lambda: _overlapped(model, paths, batch_size), 2))

    if compile:
        _compile_rows(model, memory, cl, ours, row)
    return {f"{g}: {name.strip()}": {"wall_s": round(w, 3), "cpu_s": round(c, 3)} for g, name, w, c in rows}


@contextlib.contextmanager
def _kernels_forced(use: bool):
    """GPT-2's attention in mmcap's C++ kernels (`use`) or torch's ops within the block, whatever
    the race would choose."""
    before = gpt2_attention._kernel_faster
    gpt2_attention._kernel_faster = lambda *args: use and attention_kernel.kernels() is not None
    try:
        yield
    finally:
        gpt2_attention._kernel_faster = before


@contextlib.contextmanager
def _engines_forced(engine):
    """Fresh int8 twins within the block, every weight shape on `engine` (None: each on the engine
    that measures fastest, as mmcap does); mmcap's own twins and choices are restored afterwards."""
    saved = dict(quantize._TWINS), dict(quantize._FASTEST), quantize._candidate_engines
    quantize._TWINS.clear()
    quantize._FASTEST.clear()
    if engine is not None:
        quantize._candidate_engines = lambda: (engine,)
    try:
        yield
    finally:
        quantize._TWINS.clear()
        quantize._TWINS.update(saved[0])
        quantize._FASTEST.clear()
        quantize._FASTEST.update(saved[1])
        quantize._candidate_engines = saved[2]


def _onnxruntime_rows(encoder, pixels, row):
    """The encoder on ONNX Runtime (mmcap's session: the folded fp32 twin), and with ONNX Runtime's
    dynamic int8 quantization (ConvInteger; needs no calibration data) for comparison."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from mmcap.accel.ort_encoder import export_onnx, ort_runner
    except ImportError:
        log("  encoder   ONNX Runtime rows skipped: pip install mmcap[onnx]")
        return
    run = ort_runner(encoder)
    row("encoder", "ONNX Runtime fp32, folded (int8's alternative, timed per machine)", best_time(lambda: run(pixels)))
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        plain, quantized = Path(tmp) / "encoder.onnx", Path(tmp) / "encoder-int8.onnx"
        plain.write_bytes(export_onnx(encoder))
        quantize_dynamic(str(plain), str(quantized), weight_type=QuantType.QUInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        q = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    x = {q.get_inputs()[0].name: pixels.numpy()}
    row("encoder", "  ONNX Runtime dynamic int8 (not used)", best_time(lambda: q.run(None, x)))


def _weight_format_rows(width: int, rows: int, row):
    """y = x W^T for a [4 * width, width] weight and `rows` rows: bf16, mmcap's int8 (dynamic
    activations, the engine measured fastest) and torch's int4 weight-only CPU kernel."""
    torch.manual_seed(0)
    w, x = torch.randn(4 * width, width) * 0.02, torch.randn(rows, width)
    wb, xb = w.bfloat16(), x.bfloat16()
    int8 = quantize.Int8Linear(w, None)
    label = f"{width}x{4 * width} weight, {rows} rows, x1000 calls"
    with torch.no_grad():
        row("weights", f"bf16 {label}", best_time(lambda: [F.linear(xb, wb) for _ in range(1000)]))
        row("weights", f"  int8, dynamic activations (mmcap int8, {int8.engine})", best_time(lambda: [int8(x) for _ in range(1000)]))
        group = 128
        try:
            q, scales_zeros = _int4_weight(w, group)
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            row("weights", "  int4 weight-only, groups of 128 (torch's CPU kernel; not used)",
                best_time(lambda: [torch._weight_int4pack_mm_for_cpu(xb, packed, group, scales_zeros) for _ in range(1000)]))
        except (AttributeError, RuntimeError) as e:
            log(f"  weights   int4 weight-only: not available here ({type(e).__name__})")


def _int4_weight(w: torch.Tensor, group: int):
    """Asymmetric int4 per group of `group` inputs, in the layout of torch's int4pack kernels."""
    out, inp = w.shape
    wg = w.view(out, inp // group, group)
    low, high = wg.amin(-1), wg.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-6)
    q = ((wg - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(out, inp)
    zero = low + scale * 8  # the kernels compute (q - 8) * scale + zero
    return q, torch.stack([scale.t(), zero.t()], -1).contiguous().bfloat16()


def _bf16(fn):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()
    return run


class _InstantDecoder(torch.nn.Module):
    """A decoder with fixed logits: what is left of generate() is the beam search's bookkeeping."""

    def __init__(self, logits: torch.Tensor, config):
        super().__init__()
        self.logits, self.config = logits, config

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return SimpleNamespace(logits=self.logits[: input_ids.shape[0], None])


def _sdpa_attention(q, keys_t, values, scale):
    return F.scaled_dot_product_attention(q, keys_t.transpose(-1, -2), values, scale=scale)


def _attention_calls(config, images: int, beams: int, steps: int, image_tokens: int):
    """`run(attend)`: the attention calls of decoding `images` x `beams` captions of `steps` tokens
    on the GPT-2 path under bf16 autocast: per step and layer, each row's new query against its
    self-attention keys and values (contiguous [rows, heads, positions, head_dim], keys read
    transposed, as `GPT2Decoding` keeps them), and the beams of each image together against that
    image's tokens. Returns the last outputs."""
    heads = config.num_attention_heads
    dim, layers = config.hidden_size // heads, config.num_hidden_layers
    rows, scale = images * beams, dim**-0.5
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    q_self, kv = rand(rows, heads, 1, dim), rand(2, rows, heads, steps + 1, dim)
    past = [kv[:, :, :, : t + 1].contiguous() for t in range(steps)]  # the cache at each step
    q_cross, k_img, v_img = rand(images, heads, beams, dim), rand(images, heads, dim, image_tokens), rand(images, heads, image_tokens, dim)

    @torch.no_grad()
    @torch.autocast("cpu", dtype=torch.bfloat16)
    def run(attend):
        for t in range(steps):
            for _ in range(layers):
                own = attend(q_self, past[t][0].transpose(-1, -2), past[t][1], scale)
                img = attend(q_cross, k_img, v_img, scale)
        return own, img

    return run


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
    return [c for pixels in loader for c in model.caption(pixels, batch_size=batch_size, precision="auto", **GENERATION)]


def _compile_rows(model, memory, cl, ours, row):
    """torch.compile of the encoder (static shapes) and of mmcap's whole `generate` (dynamic
    shapes; graph breaks at the data-dependent steps, so its parts compile separately)."""
    options = {"freezing": True}  # constant weights: lets inductor prepack them for oneDNN
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        encoder = torch.compile(copy.deepcopy(model.encoder).to(memory_format=torch.channels_last), options=options)
        t0 = time.perf_counter()
        encoder(cl)
        log(f"  (encoder compile: {time.perf_counter() - t0:.0f} s)")
        row("compile", "encoder bf16 channels_last, torch.compile", best_time(lambda: encoder(cl)))
    compiled_generate = torch.compile(generate, dynamic=True, options=options)
    compiled = _bf16(lambda: ours(decode=compiled_generate))
    t0 = time.perf_counter()
    compiled()
    log(f"  (decoder compile: {time.perf_counter() - t0:.0f} s)")
    row("compile", "mmcap GPT-2 path bf16, torch.compile(generate)", best_time(compiled))
