"""The int8 encoder (`mmcap.accel.int8_encoder`): the encoder's grid from oneDNN u8 x s8 convolutions
with activation ranges calibrated on the first images."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcap.accel import int8_encoder
from mmcap.images import IMAGENET_MEAN, IMAGENET_STD
from helpers import trained_like_encoder

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not int8_encoder.available(), reason="this torch has no oneDNN int8 convolutions")]


def _pixels(n, seed, size=64):
    """Normalised pixels of smooth random images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    images = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=size, mode="bilinear")
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (images - mean) / std


def _relative_error(out, ref):
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("arch,kw", [("resnet18", {}), ("resnet50", {}),
                                     ("resnet18", {"output_stride": 16}), ("resnet34", {"output_stride": 8}),
                                     ("resnet18", {"output_stride": 16, "last_stage": "layer3"})])
def test_the_int8_twin_computes_the_encoders_grid(arch, kw):
    enc = trained_like_encoder(arch, **kw)
    twin = int8_encoder.int8_encoder(enc, _pixels(8, 0))
    x = _pixels(3, 1)  # other images than the calibration's
    with torch.no_grad():
        ref = enc(x)
    out = twin(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # int8 rounding (about 6 % here, with the calibration headroom), not float and not another function
    assert 1e-4 < _relative_error(out, ref) < 0.1
    assert float(F.cosine_similarity(out.flatten(1), ref.flatten(1)).min()) > 0.995
    # batch size and image size are free: weights are packed once per image size
    packs = len(twin.stem._packed)
    y = _pixels(1, 2, size=96)
    with torch.no_grad():
        assert _relative_error(twin(y), enc(y)) < 0.1
        assert _relative_error(twin(x[:2]), enc(x[:2])) < 0.1
    assert len(twin.stem._packed) == packs + 1  # 96 px: one more; two images instead of three: none


def test_made_once_per_weights_and_recalibrated_on_request():
    enc = trained_like_encoder()
    calib = _pixels(4, 0)
    twin = int8_encoder.int8_encoder(enc, calib)
    assert int8_encoder.int8_encoder(enc, _pixels(4, 5)) is twin  # calibrated once: later images do not move it
    with torch.no_grad():
        enc.layer2[0].bn1.running_mean.add_(0.5)  # e.g. more training: remade, calibrated anew
    fresh = int8_encoder.int8_encoder(enc, calib)
    assert fresh is not twin
    x = _pixels(2, 1)
    with torch.no_grad():
        assert _relative_error(fresh(x), enc(x)) < 0.1
    dim = int8_encoder.calibrate(enc, calib * 0.25)  # ranges of much weaker activations
    assert int8_encoder.int8_encoder(enc, calib) is dim
    assert dim.stem.out_q[0] < fresh.stem.out_q[0]


def test_activations_beyond_the_calibrated_range_saturate_instead_of_wrapping():
    enc = trained_like_encoder()
    twin = int8_encoder.calibrate(enc, _pixels(4, 0) * 0.1)  # calibrated on near-grey images
    x = _pixels(2, 1)
    with torch.no_grad():
        ref = enc(x)
    out = twin(x)
    assert torch.isfinite(out).all()
    # u8 wrap-around would scramble the grid; saturation keeps its direction
    assert float(F.cosine_similarity(out.flatten(1), ref.flatten(1)).min()) > 0.8


def test_u8_max_pooling_equals_pooling_the_real_values():
    q = (0.05, 3)
    x = torch.randint(0, 256, (2, 8, 15, 15), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    pool = ((3, 3), (2, 2), (1, 1), (1, 1), False)
    out = int8_encoder._max_pool_u8(x, pool, q)
    ref = F.max_pool2d((x.float() - q[1]) * q[0], *pool)
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal((out.float() - q[1]) * q[0], ref)


def test_u8_max_pooling_without_quantized_tensors(monkeypatch):
    def gone(*args):
        raise RuntimeError("quantized tensors were removed")

    monkeypatch.setattr(torch, "_make_per_tensor_quantized_tensor", gone)
    x = torch.randint(0, 256, (1, 4, 9, 9), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    pool = ((3, 3), (2, 2), (1, 1), (1, 1), False)
    assert torch.equal(int8_encoder._max_pool_u8(x, pool, (0.1, 0)), F.max_pool2d(x.contiguous(), *pool))


def test_encoders_it_cannot_run_are_refused_by_name():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())

        def forward(self, x):
            return self.stem(x)

    with pytest.raises(int8_encoder.Unsupported, match="stem"):
        int8_encoder.Int8ResNet(Plain().eval(), _pixels(1, 0))
