"""int8's encoder: the fastest of torch's folded float twin, the int8 twin and ONNX Runtime, as timed
on this machine (`mmcap.accel.encoder_race`); each computes the encoder's grid."""
import pytest
import torch

from mmcap.accel import encoder_race as encoder_runners, int8_encoder, ort_encoder
from helpers import trained_like_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


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

    def fake_time(run, pixels):
        timed.append(_name(run))
        return 1.0 if _name(run) == faster else 2.0

    monkeypatch.setattr(encoder_runners, "_time", fake_time)
    enc = trained_like_encoder()
    x = torch.randn(2, 3, 64, 64)
    run = encoder_runners.fastest_encoder(enc, torch.float32, x)
    candidates = 3 if int8_encoder.available() else 2
    assert encoder_runners.choice(enc) == faster and len(timed) == candidates
    assert encoder_runners.fastest_encoder(enc, torch.float32, torch.randn(5, 3, 64, 64)) is run  # same choice
    assert len(timed) == candidates
    encoder_runners.fastest_encoder(enc, torch.float32, torch.randn(1, 3, 96, 96))  # another image size: timed again
    assert len(timed) == 2 * candidates
    with torch.no_grad():
        ref = enc(x)
    assert _relative_error(run(x), ref) < (0.1 if faster == "torch int8" else 1e-4)
    assert (enc in ort_encoder._SESSIONS) == (faster == "onnxruntime fp32")  # a session not chosen is freed


def test_bf16_encoders_race_the_int8_twin_but_not_onnxruntime(monkeypatch):
    timed = []
    monkeypatch.setattr(encoder_runners, "_time", lambda run, pixels: timed.append(_name(run)) or 1.0)
    enc = trained_like_encoder()
    x = torch.randn(2, 3, 64, 64)
    out = encoder_runners.fastest_encoder(enc, torch.bfloat16, x)(x)
    assert "onnxruntime fp32" not in timed and enc not in ort_encoder._SESSIONS
    assert encoder_runners.choice(enc) == "torch bfloat16" and out.dtype == torch.bfloat16  # ties: the first


def test_with_no_other_runner_torch_runs_the_encoder_untimed(monkeypatch):
    monkeypatch.setattr(ort_encoder, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(int8_encoder, "available", lambda: False)
    monkeypatch.setattr(encoder_runners, "_time", lambda run, pixels: pytest.fail("nothing to choose between"))
    enc = trained_like_encoder()
    x = torch.randn(2, 3, 64, 64)
    out = encoder_runners.fastest_encoder(enc, torch.float32, x)(x)
    assert out.dtype == torch.float32 and encoder_runners.choice(enc) == "torch float32"


def test_runners_that_fail_are_left_out_and_logged(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(ort_encoder, "ort_runner", broken)
    monkeypatch.setattr(int8_encoder, "int8_encoder", broken)
    monkeypatch.setattr(encoder_runners, "_time", lambda run, pixels: pytest.fail("nothing to choose between"))
    enc = trained_like_encoder()
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level("WARNING", logger="mmcap.accel.encoder_race"):
        out = encoder_runners.fastest_encoder(enc, torch.float32, x)(x)
    assert encoder_runners.choice(enc) == "torch float32" and "unsupported operator" in caplog.text
    with torch.no_grad():
        assert _relative_error(out, enc(x)) < 1e-4


def test_int8_captions_through_onnxruntime_equal_fp32(peaky_gpt2, image_files, monkeypatch):
    pytest.importorskip("onnxruntime")
    from mmcap.accel import precision

    monkeypatch.setattr(precision, "bf16_is_fast", lambda device="cpu": False)  # a CPU where fp32 wins
    monkeypatch.setattr(encoder_runners, "_time", lambda run, pixels: 0.0 if _name(run) == "onnxruntime fp32" else 1.0)
    paths = [str(p) for p in image_files]
    fp32 = peaky_gpt2.caption(paths, precision="fp32", max_new_tokens=6)
    int8 = peaky_gpt2.caption(paths, precision="int8", max_new_tokens=6)
    assert encoder_runners.choice(peaky_gpt2.encoder) == "onnxruntime fp32"
    assert int8 == fp32 and len(set(fp32)) > 1


@pytest.mark.skipif(not int8_encoder.available(), reason="this torch has no oneDNN int8 convolutions")
def test_int8_captions_through_the_int8_encoder_mostly_match_fp32(peaky_gpt2, image_files, monkeypatch):
    monkeypatch.setattr(encoder_runners, "_time", lambda run, pixels: 0.0 if _name(run) == "torch int8" else 1.0)
    paths = [str(p) for p in image_files]
    fp32 = peaky_gpt2.caption(paths, precision="fp32", max_new_tokens=6)
    int8 = peaky_gpt2.caption(paths, precision="int8", max_new_tokens=6)
    assert encoder_runners.choice(peaky_gpt2.encoder) == "torch int8"
    # lossy (a random tiny model is touchier than trained ones, which kept 97 % of captions)
    assert sum(a == b for a, b in zip(int8, fp32)) >= 3 and len(set(fp32)) > 1
