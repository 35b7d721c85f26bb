"""The encoder on ONNX Runtime (`mmcap.accel.ort_encoder`), one of int8's encoder runners: it computes the
encoder's grid."""
import pytest
import torch

from mmcap.accel import ort_encoder
from helpers import trained_like_encoder

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("onnxruntime")


def test_onnxruntime_session_computes_the_encoders_grid_at_any_batch_and_size():
    enc = trained_like_encoder()
    session = ort_encoder.ort_session(enc)
    run = ort_encoder.ort_runner(enc)
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
    assert float((ort_encoder.ort_runner(enc)(x) - ref).abs().max() / ref.abs().max()) < 1e-4
