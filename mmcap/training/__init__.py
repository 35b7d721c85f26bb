"""Training with Lightning: `CaptionModule` (the LightningModule), optimiser and schedule, checkpoints, CLI."""
from .checkpoint import AtomicCheckpointIO, AtomicModelCheckpoint
from .module import CaptionModule, NonFiniteLossError
from .optim import WarmupCosine, param_groups

__all__ = ["AtomicCheckpointIO", "AtomicModelCheckpoint", "CaptionModule", "NonFiniteLossError", "WarmupCosine",
           "param_groups"]
