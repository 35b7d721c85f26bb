"""mmcap's C++ one-query attention (built at first use here, as on a user's machine) against
torch's ops, and GPT-2 decoding through it against decoding through torch."""
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mmcap.accel import kernel_attention
from mmcap.accel import kernels as attention_kernel
from mmcap.accel.kernel_attention import RacedAttention
from mmcap.generation.attention import TorchAttention
from mmcap.generation.gpt2_pass import GPT2Decoding
from mmcap.generation import generate
from mmcap.generation.config import GenerationConfig

kernels = attention_kernel.kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="no C++ compiler here")


def reference(q, keys, values, scale):
    """softmax(q keys^T scale) values in fp32: q [N, H, D], keys/values [N, H, P, D]."""
    w = torch.softmax((q[:, :, None] @ keys.float().transpose(-1, -2)) * scale, -1)
    return (w @ values.float())[:, :, 0]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_self_attention_reads_each_position_from_its_ancestor_row_and_writes_the_new_one(dtype, head_dim):
    torch.manual_seed(0)
    n, heads, positions, t = 6, 3, 9, 7
    w = heads * head_dim
    k, v = torch.randn(n, heads, positions, head_dim).to(dtype), torch.randn(n, heads, positions, head_dim).to(dtype)
    qkv = torch.randn(n, 3 * w + 5)[:, : 3 * w]  # rows with a stride of their own
    anc = torch.randint(0, n, (n, positions))
    anc[:, t - 1] = torch.arange(n)
    k_out, v_out = k.clone(), v.clone()
    got = kernels.self_attend(qkv, k_out, v_out, anc, t, 0.125)

    want_k, want_v = k.clone(), v.clone()  # this step's key and value at each row's own position t-1
    want_k[:, :, t - 1] = qkv[:, w : 2 * w].reshape(n, heads, head_dim).to(dtype)
    want_v[:, :, t - 1] = qkv[:, 2 * w :].reshape(n, heads, head_dim).to(dtype)
    assert torch.equal(k_out, want_k) and torch.equal(v_out, want_v)  # bf16 rounded as torch rounds
    keys = torch.stack([want_k[anc[:, p], :, p] for p in range(t)], 2)
    values = torch.stack([want_v[anc[:, p], :, p] for p in range(t)], 2)
    want = reference(qkv[:, :w].reshape(n, heads, head_dim), keys, values, 0.125).reshape(n, w)
    assert got.shape == (n, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [1, 16, 49, 100])
@pytest.mark.parametrize("beams, head_dim", [(3, 32), (6, 64)])
def test_cross_attention_matches_torch_for_every_beam_of_every_image(dtype, positions, beams, head_dim):
    torch.manual_seed(1)
    images, heads = 4, 2
    w = heads * head_dim
    k, v = torch.randn(images, positions, w) * 3, torch.randn(images, positions, w)
    att = kernel_attention.KernelAttention(heads, [(k, v)], dtype, max_len=4, kernels=kernels)
    att.group = beams
    q = torch.randn(images * beams, 2 * w)[:, :w]
    got = att.cross_attention(0, q, 0.2)
    img = torch.arange(images * beams) // beams
    keys = k.to(dtype).view(images, positions, heads, head_dim).transpose(1, 2)[img]
    values = v.to(dtype).view(images, positions, heads, head_dim).transpose(1, 2)[img]
    want = reference(q.reshape(-1, heads, head_dim), keys, values, 0.2).reshape(-1, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def quantized(x, dim):
    """x quantized symmetrically to int8 along `dim` (round half to even), and the scales."""
    amax = x.abs().amax(dim, keepdim=True)
    # 127 / amax divided as the kernels divide (torch's scalar / tensor multiplies by a reciprocal,
    # which can differ in the last bit and flip a value at a rounding boundary)
    q = torch.where(amax > 0, x * torch.div(torch.tensor(127.0, dtype=x.dtype), amax), torch.zeros(())).round()
    return q, amax / 127


@needs_kernels
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_int8_self_attention_caches_hold_each_vector_quantized_and_attend_as_their_dequantized_values(query_dtype):
    """int8 caches: each step's key and value vectors stored as their symmetric int8 quantization
    (round half to even) with a scale each, and attention over the positions so far, read through
    the ancestor table, equals attention over what they dequantize to."""
    torch.manual_seed(3)
    n, heads, d, positions = 6, 3, 64, 8
    k = torch.zeros(n, heads, positions, d, dtype=torch.int8)
    v = torch.zeros_like(k)
    ks, vs = torch.zeros(n, heads, positions), torch.zeros(n, heads, positions)
    anc = torch.zeros(n, positions, dtype=torch.long)
    for t in range(5):
        if t:  # a beam reorder: each row continues another's history
            anc = anc[torch.randperm(n)].clone()
        anc[:, t] = torch.arange(n)
        qkv = (torch.randn(n, 3 * heads * d) * 2).to(query_dtype)
        got = kernels.self_attend(qkv, k, v, anc, t + 1, 0.125, ks, vs)
        new_k, new_ks = quantized(qkv[:, heads * d: 2 * heads * d].float().view(n, heads, d), 2)
        new_v, new_vs = quantized(qkv[:, 2 * heads * d:].float().view(n, heads, d), 2)
        assert torch.equal(k[:, :, t].float(), new_k) and torch.equal(v[:, :, t].float(), new_v)
        assert torch.equal(ks[:, :, t], new_ks[..., 0]) and torch.equal(vs[:, :, t], new_vs[..., 0])
        kd, vd = k.float() * ks[..., None], v.float() * vs[..., None]
        keys = torch.stack([kd[anc[:, p], :, p] for p in range(t + 1)], 2)
        values = torch.stack([vd[anc[:, p], :, p] for p in range(t + 1)], 2)
        want = reference(qkv[:, : heads * d].float().view(n, heads, d), keys, values, 0.125).reshape(n, -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="scales go with int8 caches"):
        kernels.self_attend(qkv, k, v, anc, 5, 0.125)


def vnni_reference(q, k8, ks, v8, vs, scale):
    """The VNNI cross-attention's arithmetic in float64: q [N, H, D]; int8 keys k8 [N, H, P, D]
    with a scale per channel ks [N, H, D], values v8 [N, H, P, D] with a scale per position vs
    [N, H, P]. Each query (times the key scales) is quantized to int8, the softmax weights times
    the value scales to unsigned 8 bits relative to their largest."""
    q8, qs = quantized(q.double() * ks.double(), 2)
    s = (q8[:, :, None] @ k8.double().transpose(-1, -2))[:, :, 0] * qs
    e = torch.exp((s - s.amax(-1, keepdim=True)) * scale)
    wts = e * vs.double()
    top = wts.amax(-1, keepdim=True)
    w8 = (wts * (255 / top)).round()
    return ((w8[:, :, None] @ v8.double())[:, :, 0] * (top / 255) / e.sum(-1, keepdim=True)).float()


@needs_kernels
@pytest.mark.parametrize("positions", [1, 49, 100])
def test_int8_image_keys_per_channel_and_values_per_row(positions):
    """int8 image keys (a scale per key channel of an image and head) and values (per position):
    the stored integers and scales are the symmetric quantization of each, and attention over them
    equals attention over what they dequantize to."""
    torch.manual_seed(2)
    images, heads, head_dim, beams = 3, 2, 64, 3
    w = heads * head_dim
    k, v = torch.randn(images, positions, w) * 3, torch.randn(images, positions, w)
    k[1, :, 5] = 0  # an all-zero key channel stays zero
    att = kernel_attention.KernelAttention(heads, [(k, v)], torch.bfloat16, max_len=4, kernels=kernels,
                                           image_dtype=torch.int8)
    att.group = beams
    packed_k, packed_v, ks, vs = att.cross[0]
    padded = packed_k.shape[-1]
    assert packed_k.dtype == packed_v.dtype == torch.int8
    assert ks.shape == (images, heads, head_dim) and vs.shape == (images, heads, padded)
    kt, vv = kernel_attention.image_int8(packed_k, packed_v, kernels.vnni_image_kv())
    want_k, want_ks = quantized(k.view(images, positions, heads, head_dim).permute(0, 2, 3, 1), 3)
    want_v, want_vs = quantized(v.view(images, positions, heads, head_dim).transpose(1, 2), 3)
    assert torch.equal(kt[..., :positions].float(), want_k) and torch.equal(vv[:, :, :positions].float(), want_v)
    torch.testing.assert_close(ks, want_ks[..., 0], rtol=0, atol=0)
    torch.testing.assert_close(vs[..., :positions], want_vs[..., 0], rtol=0, atol=0)
    assert not kt[..., positions:].any() and not vv[:, :, positions:].any() and not vs[..., positions:].any()

    q = torch.randn(images * beams, w)
    got = att.cross_attention(0, q, 0.2)
    img = torch.arange(images * beams) // beams
    keys = (want_k * want_ks).transpose(-1, -2)[img]
    values = (want_v * want_vs)[img]
    if kernels.vnni_image_kv():  # the queries and softmax weights in 8 bits too, as the kernel rounds them
        want = vnni_reference(q.reshape(-1, heads, head_dim), want_k.transpose(-1, -2)[img], want_ks[img, ..., 0],
                              want_v[img], want_vs[img, ..., 0], 0.2).reshape(-1, w)
    else:
        want = reference(q.reshape(-1, heads, head_dim), keys, values, 0.2).reshape(-1, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exact = reference(q.reshape(-1, heads, head_dim), k.view(images, positions, heads, head_dim).transpose(1, 2)[img],
                      v.view(images, positions, heads, head_dim).transpose(1, 2)[img], 0.2).reshape(-1, w)
    assert (got - exact).abs().max() < 0.1 * exact.abs().max()  # int8's rounding, no more


def gpt2(head_dim=64):
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=2 * head_dim, n_layer=2, n_head=2, vocab_size=40, n_positions=32, add_cross_attention=True,
                     bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharp distributions, EOS likelier: it comes early for some images, late for others
        model.lm_head.weight.mul_(8)
        model.lm_head.weight[1] *= 2
    return model


@needs_kernels
@pytest.mark.parametrize("num_beams, prompt", [(1, None), (3, None), (3, [5, 7, 9])])
def test_gpt2_decoding_through_the_kernels_equals_decoding_through_torch(monkeypatch, num_beams, prompt):
    """fp32 caches: the same captions, scores within rounding, with beams reordered every step
    and finished images leaving the batch (`keep`) along the way; a prompt fills positions first."""
    model, memory = gpt2(), torch.randn(6, 5, 128) * 3
    cfg = GenerationConfig(num_beams=num_beams, max_new_tokens=12)
    kept = []
    monkeypatch.setattr(kernel_attention.KernelAttention, "keep",
                        lambda self, images, orig=kernel_attention.KernelAttention.keep: kept.append(len(images))
                        or orig(self, images))
    outs, kinds = {}, {}
    for use in (False, True):
        monkeypatch.setattr(kernel_attention, "kernels_faster", lambda *a, use=use: use)
        kinds[use] = type(GPT2Decoding(model, memory, 16, RacedAttention(torch.float32)).attention)
        with torch.no_grad():
            outs[use] = generate(model, memory, 0, 1, 1, cfg, attention=RacedAttention(torch.float32),
                                 prompts=None if prompt is None else [prompt] * len(memory))
    assert kinds == {False: TorchAttention, True: kernel_attention.KernelAttention}
    assert kept, "no image finished early: the test would not cover `keep`"
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(outs[True].scores, outs[False].scores, rtol=1e-5, atol=1e-5)
    assert 0 < outs[True].lengths.min() < outs[True].lengths.max()


def test_fp32_and_fp16_never_use_the_kernels(monkeypatch):
    """The kernels round differently from torch: only the lossy modes (int8's caches in a given
    dtype, bf16 autocast) may take them; fp32 stays exactly the transformers forward."""
    monkeypatch.setattr(attention_kernel, "kernels", lambda: SimpleNamespace(pack_image_kv=lambda *a: None))
    monkeypatch.setattr(kernel_attention.timing, "fastest", lambda *a, **k: "kernels")
    kernel_attention.kernels_faster.cache_clear()
    model, memory = gpt2(), torch.randn(2, 5, 128)
    try:
        assert isinstance(GPT2Decoding(model, memory, 8).attention, TorchAttention)  # generation's own default
        assert isinstance(GPT2Decoding(model, memory, 8, RacedAttention()).attention, TorchAttention)  # the fp32 plan's
        assert isinstance(GPT2Decoding(model, memory, 8, RacedAttention(torch.float32)).attention,
                          kernel_attention.KernelAttention)
        # nor dtypes the source has no kernel for (fp16 autocast)
        with torch.autocast("cpu", dtype=torch.float16):
            assert isinstance(GPT2Decoding(model, memory, 8, RacedAttention()).attention, TorchAttention)
    finally:
        kernel_attention.kernels_faster.cache_clear()


@needs_kernels
def test_bf16_autocast_decoding_through_the_kernels_is_closer_to_fp32_than_torchs_bf16(monkeypatch):
    """Under autocast the caches hold bf16 either way; the kernels then compute in fp32, where torch's
    chain multiplies in bf16."""
    model, memory = gpt2(), torch.randn(4, 5, 128)
    seqs = torch.randint(2, 40, (4, 6))
    with torch.no_grad():
        want, _ = GPT2Decoding(model, memory, 8)(seqs)
        got = {}
        for use in (False, True):
            monkeypatch.setattr(kernel_attention, "kernels_faster", lambda *a, use=use: use)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                dec = GPT2Decoding(model, memory, 8, RacedAttention())
                got[use], _ = dec(seqs)
            assert isinstance(dec.attention, kernel_attention.KernelAttention if use else TorchAttention)
            if use:
                assert dec.attention.k[0].dtype == torch.bfloat16
    err = {use: (logits - want).abs().max().item() for use, logits in got.items()}
    assert 0 < err[True] <= err[False] * 1.5, err
    torch.testing.assert_close(got[True], want, rtol=0.05, atol=0.05 * want.abs().max().item())


@pytest.mark.parametrize("kernel_s, torch_s, chosen", [(0.001, 0.004, True), (0.004, 0.001, False)])
def test_the_race_decides_by_the_timings(monkeypatch, caplog, kernel_s, torch_s, chosen, tmp_path):
    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))  # no choice cached by another test
    monkeypatch.setattr(attention_kernel, "kernels", lambda: SimpleNamespace(pack_image_kv=lambda *a: None))
    monkeypatch.setattr(kernel_attention, "_timings", lambda *a: {"kernels": kernel_s, "torch": torch_s})
    kernel_attention.kernels_faster.cache_clear()
    with caplog.at_level(logging.INFO, logger="mmcap.accel.timing"):
        assert kernel_attention.kernels_faster(2, 64, torch.float32) is chosen
        assert not kernel_attention.kernels_faster(2, 24, torch.float32)  # a head size the source has no kernel for
    kernel_attention.kernels_faster.cache_clear()
    assert f"kernels {kernel_s * 1e3:.3f} ms, torch {torch_s * 1e3:.3f} ms" in caplog.text


def test_a_kernel_that_fails_in_the_race_leaves_torchs_ops(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))
    def broken(*args):
        raise RuntimeError("head_dim 64 not built")

    monkeypatch.setattr(attention_kernel, "kernels", lambda: SimpleNamespace(self_attend=broken, cross_attend=broken,
                                                                                pack_image_kv=broken))
    kernel_attention.kernels_faster.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mmcap.accel.kernel_attention"):
            assert not kernel_attention.kernels_faster(2, 64, torch.float32)
        assert "the C++ kernels failed on 2 heads of 64 (head_dim 64 not built)" in caplog.text
    finally:
        kernel_attention.kernels_faster.cache_clear()


def test_without_a_compiler_decoding_keeps_torchs_ops(monkeypatch, caplog, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'mmcap_attention': c++: command not found")

    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(attention_kernel, "_LOADED", {})  # as in a process that has not loaded them
    attention_kernel.kernels.cache_clear()
    kernel_attention.kernels_faster.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mmcap.accel.kernels"):
            assert attention_kernel.kernels() is None
            att = GPT2Decoding(gpt2(), torch.randn(2, 5, 128), 8, RacedAttention(torch.float32)).attention
        assert isinstance(att, TorchAttention)
        assert "could not be built (RuntimeError: Error building extension" in caplog.text
        # later processes do not try again (a compile attempt costs seconds) until the marker goes
        marker = tmp_path / "kernels" / attention_kernel.build_key() / attention_kernel.FAILED
        assert "command not found" in marker.read_text()
        monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("retried a failed build"))
        attention_kernel.kernels.cache_clear()
        assert attention_kernel.kernels() is None
    finally:
        attention_kernel.kernels.cache_clear()
        kernel_attention.kernels_faster.cache_clear()


def test_a_build_belongs_to_one_cpu_and_one_source(monkeypatch):
    """A binary built with -march=native may not run on another CPU that shares the cache."""
    key = attention_kernel.build_key()
    monkeypatch.setattr(attention_kernel, "_cpu_flags", lambda: "fpu sse2 avx2")
    other_cpu = attention_kernel.build_key()
    monkeypatch.setattr(attention_kernel, "SOURCES", (attention_kernel.Path(__file__),))
    assert len({key, other_cpu, attention_kernel.build_key()}) == 3
    monkeypatch.setenv("MMCAP_KERNELS", "0")
    attention_kernel.kernels.cache_clear()
    try:
        assert attention_kernel.kernels() is None
    finally:
        attention_kernel.kernels.cache_clear()


OTHER_CPU_CHECK = r"""
import sys, torch
from torch.utils import cpp_extension
from mmcap.accel import kernels as attention_kernel
cpp_extension.load(name="mmcap_attention_other_cpu", sources=[str(s) for s in attention_kernel.SOURCES],
                   build_directory=sys.argv[2],
                   extra_cflags=["-O3", "-march=" + sys.argv[1], "-fopenmp"], extra_ldflags=["-fopenmp"],
                   is_python_module=False)
torch.manual_seed(0)
n, heads, d, t = 6, 3, 64, 5
k, v = torch.randn(n, heads, 8, d).bfloat16(), torch.randn(n, heads, 8, d).bfloat16()
qkv = torch.randn(n, 3 * heads * d)
anc = torch.randint(0, n, (n, 8))
anc[:, t - 1] = torch.arange(n)
got = torch.ops.mmcap.self_attend(qkv, k, v, anc, t, 0.125)
keys = torch.stack([k[anc[:, p], :, p] for p in range(t)], 2).float()
values = torch.stack([v[anc[:, p], :, p] for p in range(t)], 2).float()
w = torch.softmax(qkv[:, : heads * d].view(n, heads, 1, d) @ keys.transpose(-1, -2) * 0.125, -1)
torch.testing.assert_close(got, (w @ values).reshape(n, -1), rtol=1e-5, atol=1e-5)
kt, vv = torch.randn(2, heads, d, 32), torch.randn(2, heads, 32, d)
q = torch.randn(6, heads * d)
got = torch.ops.mmcap.cross_attend(q, kt, vv, 21, 3, 0.125)
w = torch.softmax(q.view(2, 3, heads, d).transpose(1, 2) @ kt[..., :21] * 0.125, -1)
torch.testing.assert_close(got, (w @ vv[:, :, :21]).transpose(1, 2).reshape(6, -1), rtol=1e-5, atol=1e-5)
kk, vk = torch.randn(2, 21, heads * d), torch.randn(2, 21, heads * d)
kt8, vv8 = torch.empty(2, heads, d, 32, dtype=torch.int8), torch.empty(2, heads, 32, d, dtype=torch.int8)
ks, vs = torch.empty(2, heads, d), torch.empty(2, heads, 32)
torch.ops.mmcap.pack_image_kv(kk, vk, torch.arange(2), kt8, vv8, ks, vs)
# VNNI order and 8-bit queries where the target has AVX-512 VNNI (icelake-server), else the plain layout
vnni = torch.ops.mmcap.vnni_image_kv()
assert vnni == (sys.argv[1] == "icelake-server")
from mmcap.accel.kernel_attention import image_int8
kt8, vv8 = image_int8(kt8, vv8, vnni)
keys = kk.view(2, 21, heads, d).permute(0, 2, 3, 1)
amax = keys.abs().amax(-1, keepdim=True)
assert torch.equal(kt8[..., :21].float(), (keys * (127 / amax)).round()) and not kt8[..., 21:].any()
if not vnni:
    got = torch.ops.mmcap.cross_attend(q, kt8.to(torch.int8), vv8.to(torch.int8), 21, 3, 0.125, ks, vs)
    kd, vd = kt8.float() * ks[..., None], vv8.float() * vs[..., None]
    w = torch.softmax(q.view(2, 3, heads, d).transpose(1, 2) @ kd[..., :21] * 0.125, -1)
    torch.testing.assert_close(got, (w @ vd[:, :, :21]).transpose(1, 2).reshape(6, -1), rtol=1e-5, atol=1e-5)
logits = torch.randn(5, 1000) * 3
values, tokens = torch.ops.mmcap.log_softmax_top(logits, 6)
want_values, want_tokens = torch.topk(torch.log_softmax(logits, -1), 6)
assert torch.equal(tokens, want_tokens)
torch.testing.assert_close(values, want_values, rtol=0, atol=2e-6)
assert not torch.ops.mmcap.amx_int8()  # no AMX in these targets: the int8 kernel says so, and refuses
try:
    torch.ops.mmcap.int8_linear(q, torch.ops.mmcap.int8_pack(torch.ones(16, 192, dtype=torch.int8)), torch.ones(16), None, 16)
    raise SystemExit("int8_linear ran without AMX")
except RuntimeError as e:
    assert "AMX is not available" in str(e)
# AVX-512 VNNI without AMX (icelake-server): the int8 kernel's other path, to the exact product
assert torch.ops.mmcap.vnni_int8() == (sys.argv[1] == "icelake-server")
if torch.ops.mmcap.vnni_int8():
    w8 = torch.randint(-127, 128, (37, 100), dtype=torch.int8)
    x8 = torch.randint(-127, 128, (5, 100)).float()
    x8[:, 0] = 127
    sums = torch.zeros(48, dtype=torch.int32)
    sums[:37] = w8.sum(1, dtype=torch.int32)
    got = torch.ops.mmcap.int8_linear(x8, torch.ops.mmcap.int8_pack(w8), torch.ones(37), None, 37, colsum=sums)
    assert torch.equal(got.double(), x8.double() @ w8.double().t())
print("ok")
"""


@needs_kernels
@pytest.mark.slow
@pytest.mark.skipif(not attention_kernel.platform.machine() in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64", "icelake-server"])
def test_the_kernels_built_for_narrower_vectors_give_the_same_attention(march, tmp_path):
    """Other CPUs build the source with 8 lanes (AVX2) or 4 (SSE2, NEON), or with AVX-512 VNNI but
    no AMX: the same results (built in a subprocess here, since one process holds one
    `torch.ops.mmcap`), and the int8 kernel on VNNI where the target has it."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(OTHER_CPU_CHECK)
    done = subprocess.run([sys.executable, str(script), march, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_build_key_and_the_wheel_cover_every_kernel_file():
    """Every file in csrc/ is compiled or included (so it is part of the build key), and
    pyproject's package data ships it (a wheel without a header builds nothing)."""
    import fnmatch
    import tomllib

    csrc = attention_kernel.SOURCE.parent
    assert set(csrc.iterdir()) == set(attention_kernel.SOURCES + attention_kernel.HEADERS)
    pyproject = csrc.parents[2] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("an installed copy: no pyproject.toml beside the package")
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["mmcap"]
    for path in csrc.iterdir():
        rel = path.relative_to(csrc.parents[1]).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in pyproject's package data"
