"""mmcap's int8 kernel on AVX-512 VNNI (`csrc/int8_matmul.cpp`, for CPUs without AMX): the same
int32 sums as the exact integer product, and so, to the bit, the same outputs as the AMX path with
every fused part; and the engine choice that puts it in AMX's place. Skipped without AVX-512 VNNI;
the comparisons with AMX also need AMX."""
import pytest
import torch

from mmcap.accel import kernels as compiled
from mmcap.accel import quantize, timing
from mmcap.accel.quantize import Int8Linear

ops = compiled.kernels()
needs_vnni = pytest.mark.skipif(not quantize.vnni_available(), reason="no AVX-512 VNNI (or no C++ compiler) here")
needs_amx = pytest.mark.skipif(not quantize.amx_available(), reason="no AMX here to compare with")
pytestmark = [needs_vnni, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("rows,inputs,outputs", [(48, 768, 96), (5, 100, 37), (13, 192, 16 * 9 + 5), (1, 70, 3),
                                                (100, 64, 50)],
                         ids=["decoding-step", "ragged", "panels-and-an-odd-column-block", "one-row", "many-rows"])
def test_vnni_sums_are_the_exact_integer_product(rows, inputs, outputs):
    """Integer rows whose maximum is 127 quantize to themselves: the output is the exact product
    (rows taken 6 at a time, columns 4 blocks at a time, with every remainder), despite the rows
    entering VPDPBUSD as q + 128, an all-zero row among them."""
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8)
    x = torch.randint(-127, 128, (rows, inputs)).float()
    x[:, 0] = 127
    x[rows // 2] = 0  # an all-zero row: its bytes are 128 too, meeting the column sums' 128s
    got = ops.int8_linear(x, ops.int8_pack(w), torch.ones(outputs), None, outputs,
                          colsum=quantize._column_sums(w))
    assert got.shape == (rows, outputs)
    assert torch.equal(got.double(), x.double() @ w.double().t())


def test_two_threads_each_take_their_column_blocks_over_a_long_depth():
    """Two threads, 10 column blocks (5 each: a group of 4 and a lone block), 1,000 inputs (four
    depth chunks, the last short, each prefetching the next): the exact product, for the layer
    and the LM head's top k."""
    torch.manual_seed(3)
    rows, inputs, outputs = 48, 1000, 16 * 9 + 5
    w = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8)
    x = torch.randint(-127, 128, (rows, inputs)).float()
    x[:, 0] = 127
    p, sums = ops.int8_pack(w), quantize._column_sums(w)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = ops.int8_linear(x, p, torch.ones(outputs), None, outputs, colsum=sums)
        values, tokens = ops.int8_linear_top(x, p, torch.ones(outputs), None, outputs, 4, colsum=sums)
    finally:
        torch.set_num_threads(before)
    want = x.double() @ w.double().t()
    assert torch.equal(got.double(), want)
    want_values, want_tokens = torch.topk(torch.log_softmax(want, -1), 4)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(values.double(), want_values, rtol=1e-6, atol=1e-4)


def test_vnni_refuses_column_sums_of_another_shape():
    w = torch.ones(20, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int32 column sums of the weight, zero-padded to 32"):
        ops.int8_linear(torch.ones(2, 64), ops.int8_pack(w), torch.ones(20), None, 20,
                        colsum=torch.zeros(20, dtype=torch.int32))


@needs_amx
def test_vnni_equals_amx_to_the_bit_with_every_fused_part():
    """LayerNorm as the rows are quantized, GELU and residual as the outputs are written, and the
    LM head's log-softmax top k: the VNNI path's outputs are AMX's, bit for bit."""
    torch.manual_seed(1)
    rows, inputs, outputs = 23, 200, 16 * 7 + 3
    w = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8)
    p, colsum = ops.int8_pack(w), quantize._column_sums(w)
    x, w_scale, bias = torch.randn(rows, inputs) * 3, torch.rand(outputs) / 50, torch.randn(outputs)
    residual, ln_w, ln_b = torch.randn(rows, outputs), torch.rand(inputs) + 0.5, torch.randn(inputs) / 10
    amx = ops.int8_linear(x, p, w_scale, bias, outputs, residual, True, ln_w, ln_b, 1e-5)
    vnni = ops.int8_linear(x, p, w_scale, bias, outputs, residual, True, ln_w, ln_b, 1e-5, colsum)
    assert torch.equal(amx, vnni)
    amx_top = ops.int8_linear_top(x, p, w_scale, bias, outputs, 5, ln_w, ln_b, 1e-5)
    vnni_top = ops.int8_linear_top(x, p, w_scale, bias, outputs, 5, ln_w, ln_b, 1e-5, colsum)
    assert torch.equal(amx_top[0], vnni_top[0]) and torch.equal(amx_top[1], vnni_top[1])


def _without_amx(monkeypatch, tmp_path, winner):
    """A CPU without AMX, as `quantize` sees it, whose race `winner` wins (a fresh timing cache)."""
    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))
    timing.forget()
    monkeypatch.setattr(quantize, "amx_available", lambda: False)
    monkeypatch.setattr(quantize.timing, "time_calls",
                        lambda calls, repeats=5: {e: 1.0 if e == winner else 2.0 for e in calls})


def test_without_amx_the_vnni_kernel_is_raced_kept_and_fuses(monkeypatch, tmp_path):
    """Without AMX mmcap's kernel enters the race on VNNI and is the engine kept unless clearly
    beaten; its twin fuses the LayerNorm, GELU and residual and matches the float layer."""
    from mmcap.generation.gpt2_pass import gelu_tanh, linear

    _without_amx(monkeypatch, tmp_path, quantize.VNNI)
    engines = quantize._candidate_engines()
    assert quantize.VNNI in engines and quantize.AMX not in engines
    assert quantize.preferred_engine(engines) == quantize.VNNI
    torch.manual_seed(0)
    layer, ln = torch.nn.Linear(64, 48), torch.nn.LayerNorm(64)
    twin = Int8Linear(layer.weight, layer.bias)
    assert twin.engine == quantize.VNNI and twin.fused is not None and twin.head_top is not None
    h, residual = torch.randn(5, 64) * 3, torch.randn(5, 48)
    with torch.no_grad():
        want = layer(h)
        assert float((twin(h) - want).abs().max() / want.abs().max()) < 0.02
        steps = residual + gelu_tanh(twin(ln(h)))
        torch.testing.assert_close(linear(twin, h, norm=ln, gelu=True, residual=residual), steps,
                                   rtol=0.02, atol=0.02 * float(steps.abs().max()))
    timing.forget()


@needs_amx
def test_captions_without_amx_equal_those_with_amx(monkeypatch, tmp_path):
    """A whole int8 decode (beam 3) with every layer on the VNNI kernel gives the AMX kernel's
    sequences and scores: the same sums, so the same numbers everywhere."""
    from helpers import CAPTIONS, tiny_config
    from mmcap import Captioner

    def decode():
        torch.manual_seed(0)
        model = Captioner.from_config(tiny_config("gpt2"), captions=CAPTIONS).eval()
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.mul_(3)
        out = model.generate(torch.randn(4, 3, 64, 64), precision="int8", num_beams=3, max_new_tokens=8)
        engines = {t.engine for t in quantize._twins(model.decoder).values()}
        return out, engines

    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path / "amx"))
    timing.forget()
    monkeypatch.setattr(quantize.timing, "time_calls",
                        lambda calls, repeats=5: {e: 1.0 if e == quantize.AMX else 2.0 for e in calls})
    with_amx, amx_engines = decode()
    _without_amx(monkeypatch, tmp_path / "vnni", quantize.VNNI)
    without, vnni_engines = decode()
    assert amx_engines == {quantize.AMX} and vnni_engines == {quantize.VNNI}
    assert torch.equal(with_amx.sequences, without.sequences)
    assert torch.equal(with_amx.scores, without.scores)
    timing.forget()
