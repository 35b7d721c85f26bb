"""Training with Lightning: `CaptionModule` (the LightningModule) and its config blocks, callbacks,
optimiser and schedule, checkpoints, CLI."""
from .callbacks import NonFiniteGuard, NonFiniteLossError, ThroughputLogger
from .checkpoint import AtomicCheckpointIO, AtomicModelCheckpoint
from .module import CaptionModule, TrainingConfig
from .optim import OptimConfig, WarmupCosine, param_groups

__all__ = ["AtomicCheckpointIO", "AtomicModelCheckpoint", "CaptionModule", "NonFiniteGuard", "NonFiniteLossError",
           "OptimConfig", "ThroughputLogger", "TrainingConfig", "WarmupCosine", "param_groups"]
