"""Timing `mmcap fit`: `build_fit` builds model, datamodule and trainer as the CLI does,
`quiet_fit_overrides` turns off everything but training, and `StepTimer` clocks steps after a warm-up."""
from __future__ import annotations

import os

import lightning as L

from measure import clocks

def build_fit(config: str, overrides: list[str]):
    """Model, datamodule and trainer exactly as `mmcap fit --config CONFIG OVERRIDES...` builds them."""
    from mmcap.training.cli import build_cli

    cli = build_cli(["--config", config, *overrides], run=False)
    return cli.model, cli.datamodule, cli.trainer


def quiet_fit_overrides(root: str | os.PathLike) -> list[str]:
    """`mmcap fit` overrides for timing: no validation, progress bar, summary, logger, final test or
    export; checkpoints under `root`."""
    root = str(root)
    return [
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false", "--trainer.default_root_dir", root,
        "--checkpoint.dirpath", os.path.join(root, "checkpoints"), "--test_after_fit", "false",
        "--export_dir", "null",
    ]


class StepTimer(L.Callback):
    """Clocks (wall, CPU) and samples of the training steps after the first `warmup` (data loading included)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.samples = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = clocks()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.samples += batch["pixels"].shape[0]
            self.end = clocks()

    def rates(self) -> tuple[float, float]:
        """Samples per wall second and per CPU second."""
        return tuple(self.samples / (e - s) for s, e in zip(self.start, self.end))
