"""`precision="auto"` decides by measuring matmuls, not by CPU flags: tested with the timings
mocked both ways, the per-machine cache, and the recipe spelling `trainer.precision: auto`."""
import json

import pytest
import torch

from mmcap.accel import precision, timing


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))
    precision._cpu_choice.cache_clear()
    timing.forget()
    yield tmp_path
    precision._cpu_choice.cache_clear()
    timing.forget()


@pytest.mark.parametrize("fp32,bf16,expected", [
    (1.0, 0.25, torch.bfloat16),   # an AMD EPYC: bf16 4x faster
    (1.0, 2.0, torch.float32),     # an Intel Xeon without AMX: bf16 half as fast, same CPU flags
    (1.0, 0.95, torch.float32),    # barely faster is not worth bf16's rounding
])
def test_auto_follows_the_measurement_not_the_flags(fresh, monkeypatch, fp32, bf16, expected):
    calls = []
    monkeypatch.setattr(precision, "measure_matmuls", lambda: calls.append(1) or {"fp32": fp32, "bf16": bf16})
    assert precision.compute_dtype("auto") == expected
    assert precision.lightning_precision("auto") == ("bf16-mixed" if expected == torch.bfloat16 else "32-true")
    assert precision.compute_dtype("auto") == expected and len(calls) == 1  # measured once
    cached = json.loads((fresh / timing.CACHE_FILE).read_text())
    assert cached[timing.machine_key()][precision.WHAT]["seconds"] == {"fp32": fp32, "bf16": bf16}
    assert precision.cpu_bf16_speedup() == pytest.approx(fp32 / bf16)
    # a new process reads the cache instead of measuring again
    precision._cpu_choice.cache_clear()
    timing.forget()
    monkeypatch.setattr(precision, "measure_matmuls", lambda: pytest.fail("measured again"))
    assert precision.compute_dtype("auto") == expected
    assert precision.compute_dtype("fp32") == torch.float32 and precision.compute_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        precision.compute_dtype("fp16")


def test_measurement_times_real_matmuls():
    out = precision.measure_matmuls(size=32, repeats=2)
    assert set(out) == {"fp32", "bf16"} and all(0 < t < 1 for t in out.values())
    assert timing.cpu_model()  # named in logs and benchmark output


def test_recipe_precision_auto_resolves_in_the_trainer(fresh, monkeypatch):
    from mmcap.training.cli import Trainer

    monkeypatch.setattr(precision, "measure_matmuls", lambda: {"fp32": 1.0, "bf16": 2.0})
    trainer = Trainer(precision="auto", accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision == "32-true"
