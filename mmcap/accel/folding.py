"""The encoder as the fast modes run it: BatchNorm folded into the convolution before it, weights
stored in the compute dtype and channels-last.

In eval mode a BatchNorm is an affine map per channel, so it can be folded into the preceding
convolution's weights and bias: 53 fewer passes over the activations of a ResNet-50. Storing the
weights in bf16 also saves autocast's cast of every weight per call (timings:
`python benchmarks/bench_caption.py --levers`, docs/performance.md).

The folded twin rounds differently from the original (last bits), so only the fast modes use it
(bf16, and int8 in either dtype); `precision="fp32"` runs the model's own modules. Twins are made
on first use and remade when a weight or BatchNorm statistic changes (more training); the encoder
itself is never altered.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mmcap.accel import twins


def folded_encoder(encoder: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy of `encoder` (a torchvision ResNet's modules) with every BatchNorm folded
    into its convolution, weights in `dtype`, channels-last; cached until a weight changes."""
    def make() -> nn.Module:
        twin = fold_batchnorms(copy.deepcopy(encoder).eval())
        return twin.to(dtype=dtype, memory_format=torch.channels_last).requires_grad_(False)

    return twins.twin(encoder, ("folded", dtype), make)


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold, in place, every BatchNorm2d registered right after a Conv2d of the same parent (how
    torchvision's ResNet blocks, stems and downsample branches apply them) into that convolution;
    the BatchNorm becomes an Identity. Eval mode only: training needs the batch statistics."""
    if module.training:
        raise ValueError("fold_batchnorms needs an eval-mode module (BatchNorm uses running statistics)")
    for parent in list(module.modules()):
        children = list(parent._modules.items())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.num_features == conv.out_channels and bn.track_running_stats):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return module

