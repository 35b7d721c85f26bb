"""`BudgetProbe`: a Lightning callback that records where a time-budgeted `mmcap fit` spends its
wall clock, for bench_recipe.py. Not part of mmcap; added to a run from the command line:

    PYTHONPATH=benchmarks:$PYTHONPATH MMCAP_BENCH_PROBE=out.json \
        mmcap fit ... --trainer.profiler simple --trainer.callbacks+=recipe_probe.BudgetProbe

The window is Lightning's own time-budget window (the Timer callback also starts at
`on_train_start` and stops the run once `max_time` has passed), split into:

- compute: on_train_batch_start -> on_train_batch_end of every batch (forward, backward, clipping,
  optimizer and LR-scheduler step, the module's logging);
- data: Lightning's profiler row `[_TrainingEpochLoop].train_dataloader_next` (the time the loop
  blocks on the next batch);
- validation: every run of the validation loop inside the window (dataloader start-up, greedy
  decoding of the val split, metrics), less its checkpoint saves;
- checkpoint: the profiler rows of the ModelCheckpoint callback (saves at validation end);
- rest: the window less all of the above (epoch starts: DataLoader worker start-up and the
  shuffle buffer's first fill; loop and logger bookkeeping).

It also samples the learning rate and training loss every 25 steps, the process CPU time and the
load average. Needs `--trainer.profiler simple` for the data and checkpoint rows (without it they
fall into `rest`).
"""
from __future__ import annotations

import json
import os
import time

import lightning as L

DATA_ROW = "[_TrainingEpochLoop].train_dataloader_next"


class BudgetProbe(L.Callback):
    def __init__(self, path: str | None = None, every: int = 25):
        self.path = path or os.environ.get("MMCAP_BENCH_PROBE", "budget_probe.json")
        self.every = every
        self.t_start = self.t_end = None
        self.cpu_start = None
        self.compute = self.validation = 0.0
        self.val_runs = 0
        self._batch_t0 = None
        self._gaps = 0.0
        self._last_end = None
        self.epochs = 0
        self.samples = 0
        self.curve: list[tuple[int, float, float, float]] = []  # step, seconds, lr, loss
        self._patched = False
        self.final_validation = self.final_checkpoint = 0.0  # after the budget ran out (not in the window)

    @staticmethod
    def _checkpoint_seconds(rows: dict) -> float:
        return sum(sum(v) for k, v in rows.items() if "ModelCheckpoint" in k and k.startswith("[Callback]"))

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or self._patched:
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        original = loop.run

        def timed_run(*args, **kwargs):
            t0 = time.perf_counter()
            after_budget = bool(trainer.should_stop)  # the Timer has stopped training: a last validation
            rows = getattr(trainer.profiler, "recorded_durations", {}) or {}
            saved0 = self._checkpoint_seconds(rows)
            try:
                return original(*args, **kwargs)
            finally:
                if self.t_start is not None and self.t_end is None:
                    spent = time.perf_counter() - t0
                    if after_budget:
                        self.final_validation += spent
                        self.final_checkpoint += self._checkpoint_seconds(rows) - saved0
                    else:
                        self.validation += spent
                        self.val_runs += 1

        loop.run = timed_run
        self._patched = True

    def on_train_start(self, trainer, pl_module):
        self.t_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.load_start = os.getloadavg()

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._batch_t0 is not None:
            self.compute += now - self._batch_t0
        keys = batch.get("keys") if isinstance(batch, dict) else None
        self.samples += len(keys) if keys is not None else 0
        step = trainer.global_step
        if step % self.every == 0 or step == 1:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
            self.curve.append((step, round(now - self.t_start, 2), lr, round(float(loss), 4)))

    def on_train_end(self, trainer, pl_module):
        self.t_end = time.perf_counter()
        self.cpu_end = time.process_time()
        self.load_end = os.getloadavg()

    def on_fit_end(self, trainer, pl_module):
        if self.t_start is None:
            return
        end = self.t_end or time.perf_counter()
        window = end - self.t_start - self.final_validation
        rows = getattr(trainer.profiler, "recorded_durations", {}) or {}
        data = sum(rows.get(DATA_ROW, []))
        checkpoint = self._checkpoint_seconds(rows) - self.final_checkpoint
        validation = max(0.0, self.validation - checkpoint)
        rest = window - self.compute - self.validation - data
        top = sorted(((k, sum(v), len(v)) for k, v in rows.items()), key=lambda r: -r[1])[:25]
        result = {
            "steps": trainer.global_step,
            "samples": self.samples,
            "window_s": round(window, 2),
            "time": {"compute": round(self.compute, 2), "data": round(data, 2), "validation": round(validation, 2),
                     "checkpoint": round(checkpoint, 2), "rest": round(rest, 2)},
            "val_runs": self.val_runs,
            "after_budget": {"validation": round(self.final_validation - self.final_checkpoint, 2),
                             "checkpoint": round(self.final_checkpoint, 2)},
            "epochs": self.epochs,
            "precision": str(trainer.precision),
            "batch_size": getattr(trainer.datamodule, "batch_size", None),
            "process_cpu_s": round((getattr(self, "cpu_end", None) or time.process_time()) - self.cpu_start, 2),
            "loadavg_start": getattr(self, "load_start", None),
            "loadavg_end": getattr(self, "load_end", None),
            "curve": self.curve,
            "profiler_top": [(k, round(s, 2), n) for k, s, n in top],
        }
        with open(self.path, "w") as f:
            json.dump(result, f, indent=1)
