"""Training with Lightning: `CaptionModule` (the LightningModule) and its config blocks, callbacks,
optimiser and schedule, checkpoints, CLI."""
from mmcap.training.callbacks import NonFiniteGuard, NonFiniteLossError, ThroughputLogger
from mmcap.training.checkpoint import AtomicCheckpointIO, AtomicModelCheckpoint
from mmcap.training.config import TrainingConfig
from mmcap.training.module import CaptionModule
from mmcap.training.optim import OptimConfig, WarmupCosine, param_groups

__all__ = ["AtomicCheckpointIO", "AtomicModelCheckpoint", "CaptionModule", "NonFiniteGuard", "NonFiniteLossError",
           "OptimConfig", "ThroughputLogger", "TrainingConfig", "WarmupCosine", "param_groups"]
