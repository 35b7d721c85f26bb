"""Grid resolution: encoder output stride (dilation), a trunk ending after layer3, `auto`, and
the projection's position table following the grid."""
import pytest
import torch
import torchvision
from helpers import CAPTIONS, tiny_config

from mmcap import Captioner
from mmcap.config import EncoderConfig
from mmcap.model.encoder import ResNetEncoder, resolve_stride

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,channels", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("stride", [32, 16, 8])
def test_output_stride_sets_the_grid(arch, channels, stride):
    encoder = ResNetEncoder(EncoderConfig(arch=arch, output_stride=stride)).eval()
    with torch.no_grad():
        grid = encoder(torch.randn(1, 3, 64, 64))
    assert grid.shape == (1, channels, 64 // stride, 64 // stride) and encoder.stride == stride


def test_dilated_resnet50_equals_torchvision_replace_stride_with_dilation():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    ours = ResNetEncoder(EncoderConfig(arch="resnet50", output_stride=8)).eval()
    names = {"conv1": "stem.0", "bn1": "stem.1"}
    state = {}
    for key, value in reference.state_dict().items():
        head, _, rest = key.partition(".")
        if head != "fc":
            state[f"{names.get(head, head)}.{rest}"] = value
    ours.load_state_dict(state)  # the same weights fit: dilation changes no shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), torch.nn.Sequential(*list(reference.children())[:-2])(x))


def test_last_stage_layer3_and_auto():
    encoder = ResNetEncoder(EncoderConfig(arch="resnet18", output_stride="auto", last_stage="layer3"),
                            image_size=64).eval()
    assert encoder.out_channels == 256 and encoder.stride == 16
    assert not list(encoder.layer4.parameters())
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    auto = EncoderConfig(output_stride="auto")
    assert [resolve_stride(auto, size) for size in (224, 128, 96, 64, 32, 16)] == [32, 32, 16, 16, 8, 8]
    with pytest.raises(ValueError, match="output_stride"):
        EncoderConfig(output_stride=4)
    with pytest.raises(ValueError, match="layer3"):
        EncoderConfig(last_stage="layer3", output_stride=32)


def test_position_table_follows_the_grid_and_attention_maps_match_it(image_files):
    torch.manual_seed(0)
    cfg = tiny_config(encoder={"arch": "resnet18", "output_stride": "auto"},
                      projection={"kind": "linear", "max_grid": None}, image_size=64)
    model = Captioner.from_config(cfg, captions=CAPTIONS).eval()
    assert model.encoder.stride == 16 and model.projection.row_embed.shape == (4, 32)
    caption, attention = model.caption(str(image_files[0]), return_attention=True, max_new_tokens=3)
    assert attention.shape[1:] == (4, 4)
    # the resolved stride is not written into the config: a saved model rebuilds it the same way
    assert model.config.encoder.output_stride == "auto"


@pytest.mark.parametrize("image_size, output_stride, last_stage, expected", [
    (64, "auto", "auto", ("layer3", 16, 4)),    # layer4 would need dilation for 4x4: end at layer3 instead
    (96, "auto", "auto", ("layer3", 16, 6)),
    (128, "auto", "auto", ("layer4", 32, 4)),   # layer4's own stride reaches 4x4: as torchvision ends
    (224, "auto", "auto", ("layer4", 32, 7)),
    (32, "auto", "auto", ("layer4", 8, 4)),     # even layer3 is too coarse: dilate, as before
    (64, 32, "auto", ("layer4", 32, 2)),        # an explicit stride is kept (saved 0.1/0.2 models)
    (64, "auto", "layer4", ("layer4", 16, 4)),  # an explicit stage too: dilated layer4
])
def test_last_stage_auto_ends_at_layer3_where_layer4_would_need_dilation(image_size, output_stride, last_stage,
                                                                        expected):
    from mmcap.model.encoder import ResNetEncoder

    enc = ResNetEncoder(EncoderConfig(arch="resnet18", output_stride=output_stride, last_stage=last_stage),
                        load_weights=False, image_size=image_size).eval()
    with torch.no_grad():
        grid = enc(torch.zeros(1, 3, image_size, image_size))
    stage, stride, cells = expected
    assert (enc.last_stage, enc.stride, tuple(grid.shape[2:])) == (stage, stride, (cells, cells))
    assert grid.shape[1] == (512 if stage == "layer4" else 256)
    dilated = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation != (1, 1)]
    assert bool(dilated) == (stride < {"layer4": 32, "layer3": 16}[stage])
