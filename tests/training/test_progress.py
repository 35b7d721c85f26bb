"""The training progress bar counts steps against the budget that ends the run (not Lightning's
"Epoch 0/-2, 120/79" on iterable shards)."""
import math

import pytest

from mmcap.training.cli import Trainer
from mmcap.training.progress import RichStepsBar, TQDMStepsBar


def trainer(**kwargs):
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                   precision="32-true", **kwargs)


def bar_of(t):
    bars = [c for c in t.callbacks if isinstance(c, (RichStepsBar, TQDMStepsBar))]
    assert len(bars) == 1
    bars[0]._trainer = t  # what the bar's `setup` does when fitting starts
    return bars[0]


@pytest.mark.parametrize("budget, total, says_time_left", [
    (dict(max_steps=400), 400, False),                                   # a step budget
    (dict(max_steps=-1, max_time="00:00:05:00"), math.inf, True),         # a time budget
    (dict(max_steps=400, max_time="00:00:05:00"), 400, True),             # both: steps, and the time left
    (dict(max_steps=-1, max_epochs=-1), math.inf, False),                 # neither bounds the run: no total
])
def test_the_bar_shows_steps_against_the_budget(budget, total, says_time_left):
    bar = bar_of(trainer(**budget))
    assert bar.total_train_batches == total
    description = bar._get_train_description(0)
    assert ("left" in description) == says_time_left and "Epoch" not in description
    if says_time_left:
        assert "0:05:00 left" in description


def test_no_bar_when_turned_off_and_the_users_own_bar_is_kept():
    from lightning.pytorch.callbacks import TQDMProgressBar

    assert not [c for c in trainer(max_steps=5, enable_progress_bar=False).callbacks
                if isinstance(c, (RichStepsBar, TQDMStepsBar))]
    own = TQDMProgressBar()
    t = trainer(max_steps=5, callbacks=[own])
    assert own in t.callbacks and not [c for c in t.callbacks if isinstance(c, (RichStepsBar, TQDMStepsBar))]


@pytest.mark.parametrize("bar_type", [TQDMStepsBar, RichStepsBar])
def test_the_bar_reads_logged_values_every_log_every_n_steps(bar_type, monkeypatch):
    """A training step's logged values are read (`.item()`, a wait for the GPU) every
    `log_every_n_steps` steps, not every step, and the bar shows the last ones read in between."""
    if bar_type is RichStepsBar:
        pytest.importorskip("rich")
    import lightning as L
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Logged(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("train/loss", out["loss"], prog_bar=True)
            return out

    reads = []
    original = L.Trainer.progress_bar_metrics

    def counted(self):
        if self.training:
            reads.append(self.global_step)
        return original.fget(self)

    monkeypatch.setattr(L.Trainer, "progress_bar_metrics", property(counted))
    bar = bar_type()
    t = L.Trainer(accelerator="cpu", max_steps=20, log_every_n_steps=5, logger=False, enable_checkpointing=False,
                  enable_model_summary=False, limit_val_batches=0, callbacks=[bar])
    t.fit(Logged())
    assert reads and reads[:4] == [1, 6, 11, 16]  # after steps 1, 6, 11, 16: every 5 steps
    assert "train/loss" in bar._shown[1] and isinstance(bar._shown[1]["train/loss"], float)
    assert torch.isfinite(torch.tensor(bar._shown[1]["train/loss"]))
