"""Under a time budget validation keeps to 2 % of the time (`ValidationBudget`); the inputs that
decide it (a time budget, a step interval, the measured validation and training pace) are mocked
both ways."""
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Timer

from mmcap.training import callbacks
from mmcap.training.callbacks import ValidationBudget


def fake_trainer(time_budget=True, interval=200, every_n_epoch=None, step=200, elapsed=40.0, sanity=False):
    timer = Timer(duration="00:00:05:00")
    timer.time_elapsed = lambda stage="train": elapsed
    return SimpleNamespace(sanity_checking=sanity, callbacks=[timer] if time_budget else [],
                           check_val_every_n_epoch=every_n_epoch, val_check_batch=interval, global_step=step)


def validate(budget, trainer, seconds, monkeypatch):
    clock = iter([100.0, 100.0 + seconds])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    budget.on_validation_start(trainer, None)
    budget.on_validation_end(trainer, None)
    return trainer.val_check_batch


def test_a_costly_validation_is_spaced_to_two_percent_of_the_time(monkeypatch):
    budget, trainer = ValidationBudget(), fake_trainer()
    # 200 steps in 40 s (5 steps/s); a 3 s validation wants 150 s of training between validations:
    # 750 steps, rounded up to a multiple of the recipe's 200
    assert validate(budget, trainer, 3.0, monkeypatch) == 800
    trainer.global_step, trainer.callbacks[0].time_elapsed = 800, lambda stage="train": 160.0
    assert validate(budget, trainer, 0.5, monkeypatch) == 800  # never closer than before
    trainer.global_step = 1600
    trainer.callbacks[0].time_elapsed = lambda stage="train": 320.0
    assert validate(budget, trainer, 6.0, monkeypatch) == 1600  # 300 s wanted at 5 steps/s: 1,500 -> 1,600


@pytest.mark.parametrize("case", [
    dict(seconds=0.5),                                   # cheap: 25 s wanted, 125 steps < 200
    dict(seconds=3.0, trainer=dict(time_budget=False)),  # a step budget alone keeps every validation
    dict(seconds=3.0, trainer=dict(every_n_epoch=1)),    # epoch-based validation is left alone
    dict(seconds=3.0, trainer=dict(sanity=True)),        # the sanity check is not a validation run
], ids=["cheap", "step-budget", "epoch-interval", "sanity-check"])
def test_the_interval_stays_where_the_rule_does_not_apply(case, monkeypatch):
    assert validate(ValidationBudget(), fake_trainer(**case.get("trainer", {})), case["seconds"], monkeypatch) == 200
