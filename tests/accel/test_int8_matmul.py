"""mmcap's int8 linear kernel on AMX (`csrc/int8_matmul.cpp`): exact int32 sums, the rounding it
documents, and Int8Linear on it against the float layer. Skipped where the CPU has no AMX."""
import pytest
import torch

from mmcap.accel import kernels as compiled
from mmcap.accel import quantize, timing
from mmcap.accel.quantize import Int8Linear

ops = compiled.kernels()
needs_amx = pytest.mark.skipif(not quantize.amx_available(), reason="no AMX (or no C++ compiler) here")
pytestmark = [needs_amx, pytest.mark.usefixtures("one_thread")]


def packed(w: torch.Tensor) -> torch.Tensor:
    return ops.int8_pack(w)


@pytest.mark.parametrize("rows,inputs,outputs", [(48, 768, 96), (5, 100, 37), (33, 192, 16), (100, 64, 50), (1, 70, 3),
                                                (47, 130, 16 * 19 + 5)],
                         ids=["decoding-step", "ragged", "three-tiles-of-rows", "past-48-rows", "one-row",
                              "panels-and-an-odd-column-block"])
def test_sums_are_exact_for_every_row_and_column(rows, inputs, outputs):
    """Integer inputs whose row maximum is 127 quantize to themselves with scale 1: the output is the
    exact integer product, padding rows and columns included in the shapes but not the sums."""
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8)
    x = torch.randint(-127, 128, (rows, inputs)).float()
    x[:, 0] = 127
    got = ops.int8_linear(x, packed(w), torch.ones(outputs), None, outputs)
    assert got.shape == (rows, outputs) and got.dtype == torch.float32
    assert torch.equal(got.double(), x.double() @ w.double().t())


def test_rows_are_quantized_each_with_its_own_scale():
    """q = round(x * 127 / max|x|) per row (half to even), y = (q W^T) * max|x| / 127 * w_scale + bias."""
    torch.manual_seed(1)
    x = torch.randn(20, 192) * torch.logspace(-3, 3, 20)[:, None]  # rows six orders of magnitude apart
    x[3] = 0  # an all-zero row stays zero
    w = torch.randint(-127, 128, (40, 192), dtype=torch.int8)
    w_scale, bias = torch.rand(40) / 100, torch.randn(40)
    amax = x.abs().amax(1, keepdim=True)
    q = torch.where(amax > 0, (x * (127 / amax)).round(), torch.zeros_like(x))
    want = (q.double() @ w.double().t()) * (amax / 127).double() * w_scale.double() + bias.double()
    got = ops.int8_linear(x, packed(w), w_scale, bias, 40)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[3], bias)


def test_mismatched_shapes_are_refused_with_the_shapes():
    w = packed(torch.ones(32, 128, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"x \[2, 64\] does not match the packed weight of 32 outputs"):
        ops.int8_linear(torch.ones(2, 64), w, torch.ones(32), None, 32)
    with pytest.raises(RuntimeError, match="fp32 bias of 32"):
        ops.int8_linear(torch.ones(2, 128), w, torch.ones(32), torch.ones(31), 32)
    assert ops.int8_linear(torch.ones(0, 128), w, torch.ones(32), None, 32).shape == (0, 32)


def test_int8_linear_on_amx_matches_the_float_layer(monkeypatch, tmp_path):
    """The twin that races AMX against torch's engines, made to pick AMX: the float layer's output
    within int8's precision, for a decoding step's rows and for 3-D inputs."""
    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))
    timing.forget()
    monkeypatch.setattr(quantize.timing, "time_calls",
                        lambda calls, repeats=5: {e: 1.0 if e == quantize.AMX else 2.0 for e in calls})
    torch.manual_seed(0)
    layer = torch.nn.Linear(768, 2304)
    twin = Int8Linear(layer.weight, layer.bias)
    assert twin.engine == quantize.AMX and quantize.AMX in quantize._candidate_engines()
    for x in (torch.randn(48, 768), torch.randn(2, 7, 768)):
        out, want = twin(x), layer(x).detach()
        assert out.shape == want.shape
        assert float((out - want).abs().max() / want.abs().max()) < 0.02
    timing.forget()


def test_gelu_and_residual_are_applied_as_the_outputs_are_written():
    """The fused epilogue equals the unfused layer followed by GPT-2's GELU (transformers' own
    function) and the residual add, to fp32 rounding, for full and partial column blocks."""
    from transformers.activations import NewGELUActivation

    torch.manual_seed(2)
    w = torch.randint(-127, 128, (40, 128), dtype=torch.int8)  # 2 blocks of 16 columns and one of 8
    x, w_scale, bias = torch.randn(7, 128), torch.rand(40) / 50, torch.randn(40)
    residual = torch.randn(7, 40)
    p = packed(w)
    plain = ops.int8_linear(x, p, w_scale, bias, 40)
    assert plain.abs().max() > 3  # the GELU's curved part and both tails are exercised
    torch.testing.assert_close(ops.int8_linear(x, p, w_scale, bias, 40, None, True), NewGELUActivation()(plain),
                               rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ops.int8_linear(x, p, w_scale, bias, 40, residual, False), plain + residual,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"residual \[7, 40\]"):
        ops.int8_linear(x, p, w_scale, bias, 40, residual[:, :39].contiguous(), False)


def test_rows_are_layer_normed_as_they_are_quantized():
    """With a LayerNorm's weight and bias the kernel normalises each row first: the same as
    torch's LayerNorm followed by the kernel, within fp32 rounding of the normalised row."""
    torch.manual_seed(3)
    ln = torch.nn.LayerNorm(200, eps=1e-5)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    w = torch.randint(-127, 128, (24, 200), dtype=torch.int8)
    x, w_scale = torch.randn(6, 200) * 4 + 3, torch.rand(24) / 50
    p = packed(w)
    got = ops.int8_linear(x, p, w_scale, None, 24, None, False, ln.weight.detach(), ln.bias.detach(), 1e-5)
    want = ops.int8_linear(ln(x).detach(), p, w_scale, None, 24)
    # a normalised value that lands near a rounding boundary may quantize one step apart
    assert float((got - want).abs().max()) <= 2 * float((w.abs().amax() * w_scale).max()) * 3 / 127
    assert float((got - want).abs().mean()) < 1e-3 * float(want.abs().mean())
    with pytest.raises(RuntimeError, match="LayerNorm weight and bias of 200"):
        ops.int8_linear(x, p, w_scale, None, 24, None, False, torch.ones(199), torch.zeros(199), 1e-5)


def test_gpt2_decoding_asks_the_twins_to_fuse_only_on_amx(monkeypatch, tmp_path):
    """GPT-2's decoding pass hands a layer its LayerNorm, GELU and residual (`linear`): the AMX twin
    does them in its call and matches doing them one after another; a twin on torch's engines
    offers no `fused`, and `linear` then does them one after another."""
    from mmcap.generation.gpt2_pass import gelu_tanh, linear

    torch.manual_seed(0)
    layer, ln = torch.nn.Linear(64, 48), torch.nn.LayerNorm(64)
    h, residual = torch.randn(5, 64) * 3, torch.randn(5, 48)
    for engine in (quantize.AMX, quantize._candidate_engines()[0]):
        monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path / engine))
        timing.forget()
        monkeypatch.setattr(quantize.timing, "time_calls",
                            lambda calls, repeats=5: {e: 1.0 if e == engine else 2.0 for e in calls})
        twin = Int8Linear(layer.weight, layer.bias)
        assert twin.engine == engine and (twin.fused is None) == (engine != quantize.AMX)
        with torch.no_grad():
            steps = residual + gelu_tanh(twin(ln(h)))
            got = linear(twin, h, norm=ln, gelu=True, residual=residual)
            assert got.shape == (5, 48)
            torch.testing.assert_close(got, steps, rtol=0.02, atol=0.02 * float(steps.abs().max()))
            torch.testing.assert_close(linear(twin, h, residual=residual), residual + twin(h), rtol=1e-6, atol=1e-6)
            if twin.fused is not None:  # a norm the kernel does not do (no bias): torch's, then the kernel
                plain = torch.nn.LayerNorm(64, bias=False)
                assert torch.equal(linear(twin, h, norm=plain), twin(plain(h)))
    timing.forget()


@pytest.mark.parametrize("rows,outputs,k", [(48, 16 * 40 + 7, 6), (5, 37, 3), (17, 16, 16), (33, 300, 1)])
def test_lm_head_top_k_equals_the_layer_then_log_softmax_top(rows, outputs, k):
    """`int8_linear_top` never writes the outputs: each row's k best log-softmax values and their
    columns equal `log_softmax_top` over `int8_linear`'s outputs (the columns exactly, the values to
    the rounding of a sum taken in another order); among equal outputs the first columns win."""
    torch.manual_seed(5)
    w = torch.randint(-127, 128, (outputs, 96), dtype=torch.int8)
    w[outputs // 2] = w[1]  # two columns with equal outputs in every row
    x, w_scale, bias = torch.randn(rows, 96), torch.rand(outputs) / 40, torch.randn(outputs)
    w_scale[outputs // 2] = w_scale[1]
    bias[outputs // 2] = bias[1] = 1e3  # ... and the best
    ln_w, ln_b = torch.rand(96) + 0.5, torch.randn(96) / 10
    p = packed(w)
    logits = ops.int8_linear(x, p, w_scale, bias, outputs, None, False, ln_w, ln_b, 1e-5)
    want_values, want_tokens = ops.log_softmax_top(logits, k)
    values, tokens = ops.int8_linear_top(x, p, w_scale, bias, outputs, k, ln_w, ln_b, 1e-5)
    assert values.shape == tokens.shape == (rows, k) and tokens.dtype == torch.long
    assert torch.equal(tokens, want_tokens)
    atol = 2e-7 * float(logits.abs().max())  # fp32 rounding at the logits' scale
    torch.testing.assert_close(values, want_values, rtol=0, atol=atol)
    exact = torch.log_softmax(logits.double(), -1).gather(1, tokens)
    torch.testing.assert_close(values.double(), exact, rtol=0, atol=atol)
    assert bool((tokens[:, 0] == 1).all())  # the tie: the first column first
    if k > 1:
        assert bool((tokens[:, 1] == outputs // 2).all())
    with pytest.raises(RuntimeError, match="k = 0 outside"):
        ops.int8_linear_top(x, p, w_scale, bias, outputs, 0)


def test_beam_search_reads_the_lm_heads_top_k_without_logits(monkeypatch):
    """With the int8 twins on AMX, GPT-2's pass hands beam search `HeadRows` (no logits written),
    and the captions and scores equal those of the separate LM head and top k."""
    from mmcap.generation.beams import HeadRows
    from mmcap.generation.gpt2_pass import GPT2Decoding

    from helpers import CAPTIONS, tiny_config
    from mmcap import Captioner

    torch.manual_seed(0)
    model = Captioner.from_config(tiny_config("gpt2"), captions=CAPTIONS).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(3)
    pixels = torch.randn(4, 3, 64, 64)
    fused_allowed, heads_made = [True], []
    init, head = GPT2Decoding.__init__, GPT2Decoding._head

    def patched_init(self, *a, **kw):
        init(self, *a, **kw)
        self.fused_top = self.fused_top and fused_allowed[0]

    def recorded_head(self, x, top):
        out = head(self, x, top)
        heads_made.append(type(out))
        return out

    monkeypatch.setattr(GPT2Decoding, "__init__", patched_init)
    monkeypatch.setattr(GPT2Decoding, "_head", recorded_head)
    outs = {}
    for on in (True, False):
        fused_allowed[0] = on
        heads_made.clear()
        outs[on] = model.generate(pixels, precision="int8", num_beams=3, max_new_tokens=8)
        assert (HeadRows in heads_made) == on
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(outs[True].scores, outs[False].scores, rtol=0, atol=1e-4)
