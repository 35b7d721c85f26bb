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
