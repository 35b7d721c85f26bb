"""ResNet image encoder: the last convolutional grid, not the pooled vector."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn

from mmcap.config import FREEZE_POINTS, EncoderConfig

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
MIN_GRID = 4  # rows and columns the "auto" output stride guarantees


class ResNetEncoder(nn.Module):
    """torchvision ResNet without avgpool/fc: pixels [B,3,H,W] -> grid [B,C,H/s,W/s], s = `self.stride`."""

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True, image_size: Optional[int] = None):
        """`image_size` resolves `cfg.output_stride == "auto"` (see `resolve_stride`)."""
        super().__init__()
        self.cfg = cfg
        self.last_stage = resolve_last_stage(cfg, image_size)
        self.stride = resolve_stride(cfg, image_size)
        net = torchvision.models.get_model(cfg.arch, weights=None)
        if load_weights and cfg.weights:
            net.load_state_dict(_load_resnet_weights(cfg), strict=False)
        native = 32 if self.last_stage == "layer4" else 16
        stages = [net.layer2, net.layer3, net.layer4][: 3 if self.last_stage == "layer4" else 2]
        dilated = {32: 0, 16: 1, 8: 2}[self.stride] - (32 // native - 1)
        dilate_last_stages(stages, dilated)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        # Ending after layer3: layer4 is gone (no parameters), so freezing "layer4" means nothing.
        self.layer4 = net.layer4 if self.last_stage == "layer4" else nn.Identity()
        block = net.layer4[-1] if self.last_stage == "layer4" else net.layer3[-1]
        self.out_channels = (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels
        self.frozen: tuple[str, ...] = ()
        self.set_freeze(cfg.freeze)

    def set_freeze(self, freeze: str) -> None:
        """Freeze every stage up to and including `freeze` ("none", "all" or a stage name)."""
        if freeze not in FREEZE_POINTS:
            raise ValueError(f"freeze must be one of {FREEZE_POINTS}, got {freeze!r}")
        n = {"none": 0, "all": len(STAGES)}.get(freeze, STAGES.index(freeze) + 1 if freeze in STAGES else 0)
        self.frozen = STAGES[:n]
        for name in STAGES:
            getattr(self, name).requires_grad_(name not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNetEncoder":
        super().train(mode)
        # Frozen BatchNorm keeps its running statistics: stay in eval mode.
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under torchvision's ResNet names (`conv1`, `bn1`, `layer1`...; no `fc`), for
        loading into `torchvision.models.resnetNN()`."""
        names = {"0": "conv1", "1": "bn1"}  # stem = conv1, bn1, relu, maxpool
        state = {}
        for key, value in self.state_dict().items():
            head, _, rest = key.partition(".")
            if head == "stem":
                index, _, rest = rest.partition(".")
                head = names[index]
            state[f"{head}.{rest}"] = value
        return state

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resolve_last_stage(cfg: EncoderConfig, image_size: Optional[int]) -> str:
    """The stage the trunk ends at. "auto": layer3 where the output stride is "auto", layer4's own
    stride (32) gives less than a 4x4 grid at `image_size` and layer3's (16) gives one; a dilated
    layer4 would compute four times its FLOPs, on convolution kernels that run slower on CPUs.
    Else layer4, as torchvision's ResNet ends."""
    if cfg.last_stage != "auto":
        return cfg.last_stage
    if cfg.output_stride != "auto" or image_size is None:
        return "layer4"
    too_coarse = -(-image_size // 32) < MIN_GRID
    return "layer3" if too_coarse and -(-image_size // 16) >= MIN_GRID else "layer4"


def resolve_stride(cfg: EncoderConfig, image_size: Optional[int]) -> int:
    """The output stride `cfg` asks for; "auto": the largest stride whose grid at `image_size` is
    at least 4x4 (8 if none is)."""
    if cfg.output_stride != "auto":
        return int(cfg.output_stride)
    if image_size is None:
        raise ValueError("encoder.output_stride auto needs the model's image_size")
    choices = (32, 16, 8) if resolve_last_stage(cfg, image_size) == "layer4" else (16, 8)
    return next((s for s in choices if -(-image_size // s) >= MIN_GRID), choices[-1])


def dilate_last_stages(stages: list[nn.Sequential], n: int) -> None:
    """Make the last `n` of `stages` keep their input's resolution: their first block's stride
    becomes 1 and every 3x3 convolution from there on is dilated instead (2, then 4), as
    torchvision's `replace_stride_with_dilation` does, for BasicBlock ResNets (18/34) too. The
    weights keep their shapes, so pretrained weights stay valid."""
    dilation = 1
    for i, stage in enumerate(stages):
        if i < len(stages) - n:
            continue
        previous, dilation = dilation, dilation * 2
        for j, block in enumerate(stage):
            for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
                if conv.stride == (2, 2):
                    conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    d = previous if j == 0 else dilation
                    conv.dilation, conv.padding = (d, d), (d, d)


def _load_resnet_weights(cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """A local torchvision state_dict (safetensors or weights_only torch.load) or a torchvision name."""
    path = Path(cfg.weights)
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        try:
            weights = torchvision.models.get_model_weights(cfg.arch)[cfg.weights]
        except KeyError:
            names = [w.name for w in torchvision.models.get_model_weights(cfg.arch)]
            raise ValueError(
                f"encoder.weights {cfg.weights!r} is neither a file nor a torchvision weights name for "
                f"{cfg.arch} ({names})"
            ) from None
        state = weights.get_state_dict(progress=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = set(torchvision.models.get_model(cfg.arch).state_dict()) - {"fc.weight", "fc.bias"}
    missing = expected - set(state)
    if missing:
        raise ValueError(f"encoder weights {cfg.weights} do not fit {cfg.arch}: missing {sorted(missing)[:5]}")
    return state
