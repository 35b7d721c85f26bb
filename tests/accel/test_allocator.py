"""glibc keeps freed memory for reuse in the CPU fast modes (`mmcap.accel.allocator`)."""
import ctypes
import sys

import pytest
import torch

from mmcap.accel import allocator

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(allocator, "_state", {})
    for name in ("MMCAP_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)


def _spy_mallopt(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    return calls


@linux
def test_sets_both_thresholds_once(fresh, monkeypatch):
    calls = _spy_mallopt(monkeypatch)
    assert allocator.keep_freed_memory() and allocator.keep_freed_memory()
    assert calls == [(allocator.M_MMAP_THRESHOLD, 32 << 20), (allocator.M_TRIM_THRESHOLD, 512 << 20)]


@linux
@pytest.mark.parametrize("env", [{"MMCAP_MALLOC_TUNING": "0"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"}])
def test_left_alone_when_turned_off_or_set_by_the_user(fresh, monkeypatch, env):
    calls = _spy_mallopt(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not allocator.keep_freed_memory() and calls == []


def test_without_glibc_nothing_happens(fresh, monkeypatch):
    def no_libc(name):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert not allocator.keep_freed_memory()


@linux
def test_fast_modes_tune_and_fp32_does_not(fresh, monkeypatch, tiny_gpt2):
    calls = _spy_mallopt(monkeypatch)
    pixels = torch.randn(1, 3, 64, 64)
    tiny_gpt2.caption(pixels, precision="fp32", max_new_tokens=3)
    assert calls == []
    tiny_gpt2.caption(pixels, precision="bf16", max_new_tokens=3)
    assert len(calls) == 2
