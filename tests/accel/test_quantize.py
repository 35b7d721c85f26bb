"""precision="int8": the decoder's linear layers in int8 compute what they stand for, within
int8's precision, and leave the model exactly as it was."""
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from mmcap.accel import timing
from mmcap.accel.plan import as_plan
from mmcap.accel import quantize
from mmcap.accel.quantize import Int8Linear, int8_linears

pytestmark = pytest.mark.usefixtures("one_thread")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.parametrize("engine", [True, False], ids=["quantized-engine", "int_mm"])
def test_int8_linear_matches_the_float_layer(engine, monkeypatch):
    if not engine:  # the torch._int_mm path (torch builds without the x86 engine)
        monkeypatch.setattr(quantize, "int8_engine", lambda: None)
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(4, 5, 64)
    twin = Int8Linear(layer.weight, layer.bias)
    assert (twin._packed is not None) == engine and (twin.qweight is None) == engine
    out = twin(x)
    assert out.shape == (4, 5, 96) and out.dtype == torch.float32
    assert _relative_error(out, layer(x)) < 0.02
    # per output channel: a row scaled by 1000 keeps the others' precision
    with torch.no_grad():
        layer.weight[0] *= 1000
    assert _relative_error(Int8Linear(layer.weight, layer.bias)(x)[..., 1:], layer(x)[..., 1:]) < 0.03


def test_gpt2_conv1d_twin_uses_the_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(96, 64)  # GPT-2's layer: weight [in, out]
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(7, 64)
    with int8_linears(torch.nn.Sequential(conv)) as model:
        assert isinstance(model[0], Int8Linear)
        out = model(x)
    assert _relative_error(out, conv(x)) < 0.02


def test_int8_linears_restores_the_model_and_follows_weight_changes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    originals = list(model)
    x = torch.randn(2, 8)
    with int8_linears(model):
        assert isinstance(model[0], Int8Linear) and isinstance(model[2], Int8Linear)
        before = model(x)
    assert list(model) == originals  # the very same modules are back
    with torch.no_grad():
        model[2].weight.mul_(-1)  # e.g. more training: the int8 twin must be remade
    with int8_linears(model):
        after = model(x)
    assert torch.allclose(after, -(before - model[2].bias) + model[2].bias, atol=0.05)


def test_int8_captions_equal_fp32_on_a_decisive_model(peaky_gpt2, image_files):
    paths = [str(p) for p in image_files]
    fp32, fp32_scores = peaky_gpt2.caption(paths, precision="fp32", num_beams=3, max_new_tokens=8, return_scores=True)
    int8, int8_scores = peaky_gpt2.caption(paths, precision="int8", num_beams=3, max_new_tokens=8, return_scores=True)
    assert int8 == fp32 and len(set(fp32)) > 1
    assert torch.allclose(int8_scores, fp32_scores, rtol=0.05, atol=0.05)
    assert not any(isinstance(m, Int8Linear) for m in peaky_gpt2.modules())  # nothing left swapped in
    # the fp32 path afterwards is untouched
    assert peaky_gpt2.caption(paths, precision="fp32", num_beams=3, max_new_tokens=8) == fp32


def test_int8_means_auto_for_the_encoder_and_falls_back_off_cpu():
    assert as_plan("int8").dtype == as_plan("auto").dtype
    assert as_plan("int8", "cpu").int8_decoder
    assert not as_plan("bf16", "cpu").int8_decoder and not as_plan("auto", "cpu").int8_decoder
    assert not as_plan("int8", "meta").int8_decoder  # no int8 engine there: the model decodes as auto


@pytest.mark.parametrize("faster,margin", [("fbgemm", 2.0), ("onednn", 2.0), ("onednn", 1.05)],
                         ids=["fbgemm", "onednn", "onednn-by-5-percent"])
def test_each_weight_shape_runs_on_the_engine_that_measured_faster(faster, margin, monkeypatch, tmp_path):
    engines = quantize._candidate_engines()
    if len(engines) < 2:
        pytest.skip("this torch build has one x86 quantized engine")
    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))
    timing.forget()
    timed = []

    def fake_time(calls, repeats=5):
        for engine, call in calls.items():
            timed.append((engine, tuple(call.args[0].shape)))
        return {engine: 1.0 if engine == faster else margin for engine in calls}

    monkeypatch.setattr(quantize.timing, "time_calls", fake_time)
    torch.manual_seed(0)
    layer, same_shape = torch.nn.Linear(64, 96), torch.nn.Linear(64, 96)
    twin = Int8Linear(layer.weight, layer.bias)
    # a few percent either way is noise: the preferred candidate (AMX where it runs, else fbgemm)
    # stays unless clearly beaten
    prefer = quantize.preferred_engine(engines)
    needed = quantize.AMX_MIN_SPEEDUP if prefer == quantize.AMX else quantize.ENGINE_MIN_SPEEDUP
    expected = faster if margin >= needed else prefer
    assert twin.engine == expected
    assert timing.choices() == {f"int8 linear 96 x 64, {quantize.TIMING_ROWS} rows": expected}
    assert sorted(timed) == sorted((e, (quantize.TIMING_ROWS, 64)) for e in engines)
    assert Int8Linear(same_shape.weight, same_shape.bias).engine == expected and len(timed) == len(engines)  # once per shape
    x = torch.randn(3, 64)
    assert _relative_error(twin(x), layer(x)) < 0.02
