"""int8's encoder: torch's folded twin or ONNX Runtime, whichever measured faster
(`mmcap.ort_encoder`); both compute the encoder's grid."""
import pytest
import torch
from torch import nn

from mmcap import ort_encoder
from mmcap.config import EncoderConfig
from mmcap.encoder import ResNetEncoder

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("onnxruntime")


def _encoder():
    torch.manual_seed(0)
    enc = ResNetEncoder(EncoderConfig(arch="resnet18"))
    with torch.no_grad():
        for bn in (m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return enc.eval()


def test_onnxruntime_session_computes_the_encoders_grid_at_any_batch_and_size():
    enc = _encoder()
    session = ort_encoder.ort_session(enc)
    run = ort_encoder._ort_runner(enc)
    for shape in [(1, 3, 64, 64), (3, 3, 96, 128)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = enc(x)
        out = run(x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert ort_encoder.ort_session(enc) is session  # made once
    with torch.no_grad():
        enc.layer4[-1].bn2.running_mean.add_(1.0)  # e.g. more training: re-exported
    assert ort_encoder.ort_session(enc) is not session
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = enc(x)
    assert float((ort_encoder._ort_runner(enc)(x) - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize("faster", ["torch float32", "onnxruntime fp32"])
def test_the_faster_runner_is_kept_per_encoder_and_image_shape(faster, monkeypatch):
    enc = _encoder()
    timed = []

    def fake_time(run, pixels):
        timed.append(tuple(pixels.shape))
        name = "onnxruntime fp32" if len(timed) % 2 == 0 else "torch float32"  # torch is timed first
        return 1.0 if name == faster else 2.0

    monkeypatch.setattr(ort_encoder, "_time", fake_time)
    x = torch.randn(2, 3, 64, 64)
    run = ort_encoder.fastest_encoder(enc, torch.float32, x)
    assert ort_encoder.choice(enc) == faster and len(timed) == 2
    assert ort_encoder.fastest_encoder(enc, torch.float32, torch.randn(5, 3, 64, 64)) is run  # batch size: same choice
    assert len(timed) == 2
    ort_encoder.fastest_encoder(enc, torch.float32, torch.randn(1, 3, 96, 96))  # another image size: timed again
    assert len(timed) == 4
    with torch.no_grad():
        ref = enc(x)
    assert float((run(x).float() - ref).abs().max() / ref.abs().max()) < 1e-4
    assert (enc in ort_encoder._SESSIONS) == (faster == "onnxruntime fp32")  # a session not chosen is freed


def test_bf16_encoders_are_not_raced_against_onnxruntime(monkeypatch):
    monkeypatch.setattr(ort_encoder, "_time", lambda run, pixels: pytest.fail("nothing to choose between"))
    enc = _encoder()
    x = torch.randn(2, 3, 64, 64)
    assert ort_encoder.fastest_encoder(enc, torch.bfloat16, x)(x).dtype == torch.bfloat16
    assert ort_encoder.choice(enc) == "torch bfloat16" and enc not in ort_encoder._SESSIONS


def test_without_onnxruntime_torch_runs_the_encoder(monkeypatch):
    monkeypatch.setattr(ort_encoder, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(ort_encoder, "_time", lambda run, pixels: pytest.fail("nothing to choose between"))
    enc = _encoder()
    x = torch.randn(2, 3, 64, 64)
    out = ort_encoder.fastest_encoder(enc, torch.float32, x)(x)
    assert out.dtype == torch.float32 and ort_encoder.choice(enc) == "torch float32"


def test_an_encoder_onnxruntime_cannot_run_is_left_to_torch(monkeypatch, caplog):
    def broken(encoder):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(ort_encoder, "_ort_runner", broken)
    monkeypatch.setattr(ort_encoder, "_time", lambda run, pixels: pytest.fail("nothing to choose between"))
    enc = _encoder()
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level("WARNING", logger="mmcap.ort_encoder"):
        out = ort_encoder.fastest_encoder(enc, torch.float32, x)(x)
    assert ort_encoder.choice(enc) == "torch float32" and "unsupported operator" in caplog.text
    with torch.no_grad():
        assert float((out - enc(x)).abs().max() / enc(x).abs().max()) < 1e-4


def test_int8_captions_through_onnxruntime_equal_fp32(peaky_gpt2, image_files, monkeypatch):
    from mmcap import precision

    monkeypatch.setattr(precision, "bf16_is_fast", lambda device="cpu": False)  # a CPU where fp32 wins
    # ONNX Runtime measures faster (its runner is the function `run`; torch's is a lambda)
    monkeypatch.setattr(ort_encoder, "_time", lambda run, pixels: 0.0 if run.__name__ == "run" else 1.0)
    paths = [str(p) for p in image_files]
    fp32 = peaky_gpt2.caption(paths, precision="fp32", max_new_tokens=6)
    int8 = peaky_gpt2.caption(paths, precision="int8", max_new_tokens=6)
    assert ort_encoder.choice(peaky_gpt2.encoder) == "onnxruntime fp32"
    assert int8 == fp32 and len(set(fp32)) > 1
