"""The training progress display: steps against the budget that ends the run.

On iterable shards an "epoch" is whatever the loader's length estimate says, so Lightning's bar
showed "Epoch 0/-2" and "120/79". Here the bar counts optimizer steps over the whole run: against
`max_steps` where a step budget ends it, with the time left where `max_time` does (both where both
are set), and with no total where neither bounds the run.

The logged values it shows (`train/loss`) are read every `trainer.log_every_n_steps` steps, as the
loggers write them, not every step: reading a value logged as a GPU tensor waits for the GPU
(`.item()`), which kept every training step waiting on the one before.
"""
from __future__ import annotations

import datetime
from typing import Optional, Union

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from mmcap.training.callbacks import time_budget


def total_steps(trainer) -> Optional[int]:
    """The step budget, or None where no `max_steps` bounds the run."""
    return trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None


def time_left(trainer) -> Optional[float]:
    """Seconds left of `max_time`, or None without one."""
    timer = time_budget(trainer)
    return None if timer is None else max(0.0, float(timer.time_remaining("train") or 0.0))


def describe(trainer) -> str:
    """"Training", with the time left of a time budget."""
    left = time_left(trainer)
    if left is None:
        return "Training"
    return f"Training, {datetime.timedelta(seconds=round(left))} left"


class _StepsMixin:
    """Overrides shared by both of Lightning's bars: the total and the position are steps of the run;
    the logged values shown are read every `log_every_n_steps` steps of training."""

    _shown: Optional[tuple[int, dict]] = None  # (step, values) last read while training

    def get_metrics(self, trainer, pl_module) -> dict:
        if not trainer.training:  # validation, the end of an epoch: as they are now
            return super().get_metrics(trainer, pl_module)
        step = trainer.global_step
        if self._shown is None or step - self._shown[0] >= max(1, trainer.log_every_n_steps) or step < self._shown[0]:
            self._shown = (step, super().get_metrics(trainer, pl_module))
        return self._shown[1]

    @property
    def total_train_batches(self) -> Union[int, float]:
        steps = total_steps(self.trainer)
        return float("inf") if steps is None else steps

    def _get_train_description(self, current_epoch: int) -> str:  # RichProgressBar's hook
        return describe(self.trainer)


class RichStepsBar(_StepsMixin, RichProgressBar):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.train_progress_bar_id is None:  # once: the bar runs across epochs
            super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                                 description=describe(trainer))


class TQDMStepsBar(_StepsMixin, TQDMProgressBar):
    def on_train_epoch_start(self, trainer, *args) -> None:
        if self._train_progress_bar is None or trainer.current_epoch == 0:  # once: the bar runs across epochs
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.total = total_steps(trainer)  # None: tqdm shows no total
        self.train_progress_bar.set_description(describe(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        bar.set_description(describe(trainer), refresh=False)
        bar.set_postfix(self.get_metrics(trainer, pl_module))


def steps_bar():
    """The bar for a training run (rich where installed, as Lightning's default)."""
    return RichStepsBar() if _RICH_AVAILABLE else TQDMStepsBar()
