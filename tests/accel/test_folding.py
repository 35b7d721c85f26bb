"""The folded encoder (`mmcap.accel.folding`): BatchNorm folded into convolutions computes what the
encoder computes, is remade when the encoder changes, and leaves the encoder as it was."""
import copy

import pytest
import torch
from torch import nn

from mmcap.accel.folding import fold_batchnorms, folded_encoder
from helpers import trained_like_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,stride", [("resnet18", 32), ("resnet50", 16)])
def test_folded_encoder_computes_the_same_grid(arch, stride):
    enc = trained_like_encoder(arch, output_stride=stride)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = enc(x)
        folded = fold_batchnorms(copy.deepcopy(enc))
        out = folded(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    identities = sum(isinstance(m, nn.Identity) for m in folded.modules()) - sum(isinstance(m, nn.Identity) for m in enc.modules())
    assert identities == sum(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    assert out.shape == ref.shape
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    with torch.no_grad():
        twin_out = folded_encoder(enc, torch.bfloat16)(x.bfloat16().contiguous(memory_format=torch.channels_last))
    assert twin_out.dtype == torch.bfloat16
    assert float((twin_out.float() - ref).abs().max() / ref.abs().max()) < 0.05


def test_folded_twin_is_cached_remade_on_change_and_leaves_the_encoder_alone():
    enc = trained_like_encoder()
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    twin = folded_encoder(enc, torch.bfloat16)
    assert folded_encoder(enc, torch.bfloat16) is twin
    assert [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)] == bns  # untouched
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = twin(x.bfloat16())
        bns[-1].running_mean.add_(3.0)  # e.g. more training
        remade = folded_encoder(enc, torch.bfloat16)
        after = remade(x.bfloat16())
        ref = enc(x)
    assert remade is not twin and not torch.equal(before, after)
    assert float((after.float() - ref).abs().max() / ref.abs().max()) < 0.05


def test_folding_refuses_a_training_module():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorms(trained_like_encoder().train())


@pytest.mark.parametrize("bf16_fast", [True, False], ids=["bf16-machine", "fp32-machine"])
def test_fast_modes_encode_through_the_twin_and_fp32_never_does(bf16_fast, peaky_gpt2, image_files, monkeypatch):
    from mmcap.accel import encoder_race, int8_encoder, ort_encoder, plan

    monkeypatch.setattr(plan, "bf16_is_fast", lambda device="cpu": bf16_fast)
    # torch's float twin alone (the int8 twin and ONNX Runtime: test_encoder_runners)
    monkeypatch.setattr(ort_encoder, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(int8_encoder, "available", lambda: False)
    used = []
    real = plan.folded_encoder
    spy = lambda enc, dtype: used.append(dtype) or real(enc, dtype)  # noqa: E731
    monkeypatch.setattr(plan, "folded_encoder", spy)
    monkeypatch.setattr(encoder_race, "folded_encoder", spy)
    paths = [str(p) for p in image_files]
    fp32 = peaky_gpt2.caption(paths, precision="fp32", max_new_tokens=6)
    assert used == []  # fp32 runs the model's own modules: exactly the reference computation
    int8 = peaky_gpt2.caption(paths, precision="int8", max_new_tokens=6)
    # int8 encodes in `auto`'s dtype: bf16 where it measured fast, else a folded fp32 channels-last twin
    assert used == [torch.bfloat16 if bf16_fast else torch.float32]
    assert int8 == fp32 and len(set(fp32)) > 1
