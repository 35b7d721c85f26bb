"""`OptimConfig`, AdamW parameter groups and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

@dataclass
class OptimConfig:
    """A recipe's `model.optim` block: how the parameters are updated."""

    lr: float = 1e-4  # peak learning rate of the decoder and projection
    encoder_lr_mult: float = 0.1  # the encoder's rate is lr * encoder_lr_mult
    weight_decay: float = 0.05  # AdamW decay of weight matrices (never biases, norms or embeddings)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1000  # linear warm-up in optimizer steps, then cosine decay
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    # Schedule length in optimizer steps; default trainer.max_steps (or the trainer's estimate).
    total_steps: Optional[int] = None
    # Optimizer steps during which the whole encoder (BatchNorm statistics too) stays fixed.
    freeze_encoder_steps: int = 0
    # The tanh gates of inserted cross-attention blocks (`decoder.fusion: cross_attention` on a
    # causal LM) start at zero, and the image reaches the LM only as fast as they open: their rate
    # is lr * gate_lr_mult (no decay). Llama cross-attention, glyphs demo, 5-minute budget, beam-3
    # CIDEr-D: 1x 3.01 (scalar gates 2.69), 10x 4.70, 100x 5.93; on the shapes demo (400 steps)
    # 10x and 100x both 7.37 (README, "Choosing a decoder").
    gate_lr_mult: float = 100.0
    # AdamW's fused kernel: None (default) where the parameters are on a GPU. With it the
    # non-finite guard skips a bad step on the device (`found_inf`) instead of syncing every step.
    fused: Optional[bool] = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr <= 0 or self.warmup_steps < 0 or self.freeze_encoder_steps < 0:
            raise ValueError("optim: lr must be > 0, warmup_steps and freeze_encoder_steps >= 0")
        if self.gate_lr_mult <= 0:
            raise ValueError(f"optim.gate_lr_mult must be > 0, got {self.gate_lr_mult}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


# Modules whose weights are scales, offsets or lookup tables rather than projections: decaying
# them towards zero only hurts (norm gains, token/position tables).
NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases, norms, embeddings, 1-D tensors."""
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, NO_DECAY_MODULES) or p.ndim < 2 or p_name.endswith("bias") or "embed" in p_name:
                names.add(full)
    return names


GATE_SUFFIX = "_gate"  # mmcap.model.fusion.GatedCrossAttention's attn_gate and mlp_gate


def param_groups(model: nn.Module, lr: float, weight_decay: float, encoder_lr_mult: float = 1.0,
                 encoder_prefix: str = "encoder.", gate_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups {encoder, rest} x {decay, no decay}, plus `gates` (the fusion's tanh gates,
    at lr * gate_lr_mult, no decay) when the model has any; every parameter exactly once.

    Frozen parameters are included too, so that unfreezing later needs no new optimizer; AdamW
    skips parameters whose `.grad` is None. Shared (tied) parameters appear once, under the name
    `named_parameters` gives them first.
    """
    skip_decay = no_decay_names(model)
    groups = {
        (enc, decay): {"name": f"{'encoder' if enc else 'decoder'}{'' if decay else '_no_decay'}", "params": [],
                       "lr": lr * (encoder_lr_mult if enc else 1.0), "weight_decay": weight_decay if decay else 0.0}
        for enc in (True, False) for decay in (True, False)
    }
    groups["gates"] = {"name": "gates", "params": [], "lr": lr * gate_lr_mult, "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if name.endswith(GATE_SUFFIX) and not name.startswith(encoder_prefix):
            groups["gates"]["params"].append(p)
        else:
            groups[(name.startswith(encoder_prefix), name not in skip_decay)]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


class WarmupCosine:
    """LR multiplier at optimizer step `step` (0-based): linear warm-up reaching 1 at step
    `warmup_steps - 1`, then cosine decay reaching `min_ratio` at `total_steps` (held there after).
    A plain object, not a lambda, so that `LambdaLR.state_dict` saves it."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.warmup_steps, self.total_steps, self.min_ratio = int(warmup_steps), int(total_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int):
    """AdamW over `param_groups` and a per-step `LambdaLR(WarmupCosine)`."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.encoder_lr_mult, gate_lr_mult=cfg.gate_lr_mult)
    fused = cfg.fused
    if fused is None:
        fused = any(p.is_cuda for p in model.parameters())
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=bool(fused) or None)
    schedule = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
