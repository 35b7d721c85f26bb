"""Cross-cutting training concerns as Lightning Callbacks: the non-finite-step guard, throughput
logging, and what a time budget changes (the schedule's length, validation's spacing).
`CaptionModule.configure_callbacks` adds them to every run."""
from __future__ import annotations

import math
import time
from typing import Optional

import lightning as L
import torch


class NonFiniteLossError(RuntimeError):
    """Raised after `max_bad_steps` consecutive steps with a non-finite loss or gradient."""


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose loss or gradients are not finite, the same decision on every
    rank, and raises `NonFiniteLossError` after `max_bad_steps` in a row.

    Two ways, one decision. With a fused AdamW (the default on GPUs: `OptimConfig.fused`) the
    decision stays on the device: the optimizer's `found_inf` makes its kernel skip the update, as
    GradScaler does, and the bad-step counts are device tensors the host reads every
    `max_bad_steps` steps, so a step costs no device-to-host sync. Otherwise (CPUs) the host
    decides each step and drops the gradients of a bad step. Either way AdamW's state is untouched
    by a skipped step.

    Logs `train/grad_norm` each step and `train/bad_steps` (on the device path every step, else
    when a step is skipped). Under a GradScaler (16-mixed) overflowing gradients are routine and
    the scaler skips those itself.
    """

    def __init__(self, max_bad_steps: int = 20):
        self.max_bad_steps = max_bad_steps
        self._bad_steps = 0  # skipped steps in this run (host path)
        self._consecutive = 0
        self._nonfinite_loss = False
        self._loss_finite: Optional[torch.Tensor] = None  # device path: this step's loss was finite
        self._device_counts: Optional[torch.Tensor] = None  # device path: [skipped, consecutive]

    @property
    def bad_steps(self) -> int:
        device = 0 if self._device_counts is None else int(self._device_counts[0].item())
        return self._bad_steps + device

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        if _on_device(trainer):
            self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        else:
            self._nonfinite_loss |= not bool(finite)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if _on_device(trainer):
            self._skip_on_device(trainer, pl_module, getattr(optimizer, "optimizer", optimizer))
            return
        bad = self._nonfinite_loss
        self._nonfinite_loss = False
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grad_norm = _grad_norm(pl_module)
            bad = bad or not bool(torch.isfinite(grad_norm))
            pl_module.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self._consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without .grad untouched
        self._bad_steps += 1
        self._consecutive += 1
        pl_module.log("train/bad_steps", float(self._bad_steps), on_step=True, on_epoch=False)
        if self._consecutive >= self.max_bad_steps:
            self._raise(self._consecutive, trainer)

    def _skip_on_device(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grad_norm = _grad_norm(pl_module)
        pl_module.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        finite = torch.isfinite(grad_norm)
        if self._loss_finite is not None:
            finite = finite & self._loss_finite.to(finite.device)
        self._loss_finite = None
        # a bad step on any rank is bad on all (a sum over ranks: a collective, not a host sync)
        found = (trainer.strategy.reduce((~finite).float(), reduce_op="sum") > 0).float()
        optimizer.found_inf = found  # fused AdamW skips its update (and its step count) where this is 1
        counts = self._device_counts
        if counts is None:
            counts = torch.zeros(2, device=found.device)
        self._device_counts = torch.stack([counts[0] + found, (counts[1] + found) * found])
        pl_module.log("train/bad_steps", self._device_counts[0], on_step=True, on_epoch=False)
        if (trainer.global_step + 1) % self.max_bad_steps == 0:  # the host looks now and then
            consecutive = int(self._device_counts[1].item())
            if consecutive >= self.max_bad_steps:
                self._raise(consecutive, trainer)

    @staticmethod
    def _raise(consecutive: int, trainer: L.Trainer) -> None:
        raise NonFiniteLossError(
            f"{consecutive} consecutive training steps had a non-finite loss or gradient (step "
            f"{trainer.global_step}); the run is diverging or the data is broken. Try a lower model.optim.lr, "
            "gradient clipping (trainer.gradient_clip_val), bf16-mixed instead of 16-mixed, or check the data."
        )


def _grad_norm(pl_module: L.LightningModule) -> torch.Tensor:
    grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=pl_module.device)


def _on_device(trainer: L.Trainer) -> bool:
    """Whether the guard decides on the device: a fused Adam(W), whose kernel takes `found_inf`, and
    no GradScaler (which owns `found_inf` then)."""
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return False
    optimizers = trainer.optimizers
    if len(optimizers) != 1:
        return False
    optimizer = getattr(optimizers[0], "optimizer", optimizers[0])
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


class ThroughputLogger(L.Callback):
    """`train/samples_per_s` and `train/tokens_per_s` (predicted tokens), over all ranks,
    measured between consecutive training batches."""

    def __init__(self) -> None:
        self._last: Optional[float] = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None and batch.get("keys"):
            dt, world, n = now - self._last, trainer.world_size, len(batch["keys"])
            pl_module.log("train/samples_per_s", n * world / dt, on_step=True, on_epoch=False, batch_size=n)
            if "attention_mask" in batch:
                tokens = batch["attention_mask"][:, 1:].sum().float()
                pl_module.log("train/tokens_per_s", tokens * world / dt, on_step=True, on_epoch=False, batch_size=n)
        self._last = now


class TimeBudgetSchedule(L.Callback):
    """Anneals the learning-rate schedule within `trainer.max_time` when time, not a step count,
    ends the run (`--trainer.max_time 00:00:05:00 --trainer.max_steps -1`).

    After every step it re-estimates the schedule's length from the measured pace: steps done so
    far over the time they took (validation included), times the time left. The cosine then ends
    at the budget instead of being cut off wherever the clock stops it. With both max_steps and
    max_time, the schedule follows whichever ends first. The estimate lives in the schedule
    object, so a resumed run keeps it.
    """

    MIN_STEPS = 5  # the first steps carry start-up costs: measure a few before trusting the pace

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        schedule = time_budget_schedule(trainer)
        timer = time_budget(trainer)
        if schedule is None or timer is None or getattr(pl_module, "fixed_schedule_length", False):
            return
        step = trainer.global_step
        elapsed, remaining = timer.time_elapsed("train"), timer.time_remaining("train")
        if step < self.MIN_STEPS or not elapsed or remaining is None:
            return
        estimate = step + int(remaining * step / elapsed)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            estimate = min(estimate, trainer.max_steps)
        schedule.total_steps = max(estimate, step + 1, schedule.warmup_steps + 1)


class ValidationBudget(L.Callback):
    """Keeps validation within `SHARE` (2 %) of a time budget: where `trainer.max_time` ends the run
    and validation comes every N steps (`val_check_interval: N`), each validation's measured time
    stretches the interval to the smallest multiple of N whose steps, at the pace so far, take at
    least 1 / SHARE times as long. Validation during training is for watching the run; the time
    is for training. A step budget alone, an epoch-based interval or a cheap validation keep N.
    """

    SHARE = 0.02

    def __init__(self) -> None:
        self._base: Optional[int] = None
        self._started: Optional[float] = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter() if not trainer.sanity_checking else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timer, started, self._started = time_budget(trainer), self._started, None
        interval = trainer.val_check_batch
        if (started is None or timer is None or trainer.check_val_every_n_epoch is not None
                or not isinstance(interval, int) or trainer.global_step < 1):
            return
        self._base = self._base or interval
        elapsed = timer.time_elapsed("train")
        if not elapsed:
            return
        took = time.perf_counter() - started
        wanted_s = took / self.SHARE  # training time between validations
        steps = math.ceil(wanted_s * trainer.global_step / elapsed)
        trainer.val_check_batch = max(interval, self._base * math.ceil(steps / self._base))


def time_budget(trainer: L.Trainer):
    """Lightning's Timer callback (present when trainer.max_time is set), else None."""
    from lightning.pytorch.callbacks import Timer

    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def time_budget_schedule(trainer: L.Trainer):
    """The `WarmupCosine` of the first scheduler, if that is what the module configured."""
    from mmcap.training.optim import WarmupCosine

    for config in trainer.lr_scheduler_configs:
        for fn in getattr(config.scheduler, "lr_lambdas", []):
            if isinstance(fn, WarmupCosine):
                return fn
    return None
