"""`model.training.compile`: the training step's teacher-forced loss through `torch.compile`.

Why: on a GPU an eager step of ResNet-50 + GPT-2 spends more time queueing its few thousand
kernels than the GPU spends running them; a compiled step fuses the element-wise work (autocast's
casts, GELUs, norms, the loss) into a few kernels, and `mode="reduce-overhead"` replays them as
CUDA graphs. The captioner itself stays an ordinary module: its state dict, checkpoints and
`save_pretrained` never see the compiled wrapper. Generation (validation, SCST's samples) stays
eager: its shapes change every token.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from mmcap.config import compile_kwargs

CompileOption = Union[bool, dict, None]


def compile_options(value: CompileOption) -> Optional[dict[str, Any]]:
    """`torch.compile` keyword arguments for a recipe's `compile` value: None where it is off;
    `true` means torch's defaults (inductor); a mapping is passed through ({"mode": "max-autotune"},
    {"backend": "aot_eager"}, {"dynamic": false}, ...)."""
    return compile_kwargs(value, "model.training.compile")


def compiled_loss(captioner: torch.nn.Module, value: CompileOption) -> Optional[Callable[..., torch.Tensor]]:
    """The captioner's `forward` (the loss) compiled with `value`'s options, or None where compiling is off.

    A bound method is compiled rather than the module, so that nothing registers the wrapper as a
    submodule. Dynamo guards on what a step changes (a frozen encoder's `requires_grad` and eval
    mode, token dropout's hook, the caption width): each variant compiles once and is reused, and a
    second caption width makes that dimension dynamic instead of compiling per width.
    """
    options = compile_options(value)
    if options is None:
        return None
    return torch.compile(captioner.forward, **options)
