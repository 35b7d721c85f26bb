"""int8's encoder: the fastest of torch's folded float twin, the int8 twin and ONNX Runtime, as timed
on this machine (`mmcap.accel.encoder_race`); each computes the encoder's grid."""
import pytest
import torch

from helpers import trained_like_encoder

from mmcap.accel import encoder_race, int8_encoder, ort_encoder, twins

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    """Every test's encoders share one shape: no test may reuse another's cached choice."""
    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))


def timings(pick=None, record=None):
    """A stand-in for `timing.time_calls`: `pick(name)` seconds per candidate name."""
    def time_calls(calls, repeats=5):
        if record is not None:
            record.extend(calls)
        return {name: pick(name) if pick else 1.0 for name in calls}
    return time_calls


def choice(enc, dtype=torch.float32, shape=(3, 64, 64)):
    return encoder_race.choice(enc, dtype, shape)


def _name(run) -> str:
    """Which candidate a runner is: the int8 twin, ONNX Runtime's function `run`, or torch's lambda."""
    if isinstance(run, int8_encoder.Int8ResNet):
        return "torch int8"
    return "onnxruntime fp32" if getattr(run, "__name__", "") == "run" else "torch float32"


def _relative_error(out, ref):
    return float((out.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("faster", ["torch float32", "torch int8", "onnxruntime fp32"])
def test_the_fastest_runner_is_kept_per_encoder_and_image_shape(faster, monkeypatch):
    pytest.importorskip("onnxruntime")
    if faster == "torch int8" and not int8_encoder.available():
        pytest.skip("this torch has no oneDNN int8 convolutions")
    timed = []
    monkeypatch.setattr(encoder_race.timing, "time_calls", timings(lambda n: 1.0 if n == faster else 2.0, timed))
    enc = trained_like_encoder()
    x = torch.randn(2, 3, 64, 64)
    run = encoder_race.fastest_encoder(enc, torch.float32, x)
    candidates = 3 if int8_encoder.available() else 2
    assert choice(enc) == faster and len(timed) == candidates
    assert encoder_race.fastest_encoder(enc, torch.float32, torch.randn(5, 3, 64, 64)) is run  # same choice
    assert len(timed) == candidates
    encoder_race.fastest_encoder(enc, torch.float32, torch.randn(1, 3, 96, 96))  # another image size: timed again
    assert len(timed) == 2 * candidates
    with torch.no_grad():
        ref = enc(x)
    assert _relative_error(run(x), ref) < (0.1 if faster == "torch int8" else 1e-4)
    assert (twins.held(enc, "onnxruntime") is not None) == (faster == "onnxruntime fp32")  # a session not chosen is freed


def test_bf16_encoders_race_the_int8_twin_but_not_onnxruntime(monkeypatch):
    timed = []
    monkeypatch.setattr(encoder_race.timing, "time_calls", timings(record=timed))
    enc = trained_like_encoder()
    x = torch.randn(2, 3, 64, 64)
    out = encoder_race.fastest_encoder(enc, torch.bfloat16, x)(x)
    assert "onnxruntime fp32" not in timed and twins.held(enc, "onnxruntime") is None
    assert choice(enc, torch.bfloat16) == "torch bfloat16" and out.dtype == torch.bfloat16  # ties: the first


def test_with_no_other_runner_torch_runs_the_encoder_untimed(monkeypatch):
    monkeypatch.setattr(ort_encoder, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(int8_encoder, "available", lambda: False)
    monkeypatch.setattr(encoder_race.timing, "time_calls", lambda *a, **k: pytest.fail("nothing to choose between"))
    enc = trained_like_encoder()
    x = torch.randn(2, 3, 64, 64)
    out = encoder_race.fastest_encoder(enc, torch.float32, x)(x)
    assert out.dtype == torch.float32 and choice(enc) is None  # one candidate: nothing timed, nothing cached


def test_runners_that_fail_are_left_out_and_logged(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(ort_encoder, "ort_runner", broken)
    monkeypatch.setattr(int8_encoder, "int8_encoder", broken)
    monkeypatch.setattr(encoder_race.timing, "time_calls", lambda *a, **k: pytest.fail("nothing to choose between"))
    enc = trained_like_encoder()
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level("WARNING", logger="mmcap.accel.encoder_race"):
        out = encoder_race.fastest_encoder(enc, torch.float32, x)(x)
    assert choice(enc) == "torch float32" and "unsupported operator" in caplog.text
    with torch.no_grad():
        assert _relative_error(out, enc(x)) < 1e-4


def test_int8_captions_through_onnxruntime_equal_fp32(peaky_gpt2, image_files, monkeypatch):
    pytest.importorskip("onnxruntime")
    from mmcap.accel import plan

    monkeypatch.setattr(plan, "bf16_is_fast", lambda device="cpu": False)  # a CPU where fp32 wins
    monkeypatch.setattr(encoder_race.timing, "time_calls", timings(lambda n: 0.0 if n == "onnxruntime fp32" else 1.0))
    paths = [str(p) for p in image_files]
    fp32 = peaky_gpt2.caption(paths, precision="fp32", max_new_tokens=6)
    int8 = peaky_gpt2.caption(paths, precision="int8", max_new_tokens=6)
    assert choice(peaky_gpt2.encoder, shape=(3, 64, 64)) == "onnxruntime fp32"
    assert int8 == fp32 and len(set(fp32)) > 1


@pytest.mark.skipif(not int8_encoder.available(), reason="this torch has no oneDNN int8 convolutions")
def test_int8_captions_through_the_int8_encoder_mostly_match_fp32(peaky_gpt2, image_files, monkeypatch):
    monkeypatch.setattr(encoder_race.timing, "time_calls", timings(lambda n: 0.0 if n == "torch int8" else 1.0))
    paths = [str(p) for p in image_files]
    fp32 = peaky_gpt2.caption(paths, precision="fp32", max_new_tokens=6)
    int8 = peaky_gpt2.caption(paths, precision="int8", max_new_tokens=6)
    assert encoder_race.timing.choices()  # raced
    assert any(v == "torch int8" for k, v in encoder_race.timing.choices().items() if k.startswith("encoder"))
    # lossy (a random tiny model is touchier than trained ones, which kept 97 % of captions)
    assert sum(a == b for a, b in zip(int8, fp32)) >= 3 and len(set(fp32)) > 1
