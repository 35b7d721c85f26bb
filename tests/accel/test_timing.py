"""The one timing helper: alternating rounds, the minimum kept, choices cached per machine and
shape, and a cache that is stale or corrupt timed again instead of trusted."""
import json

import pytest

from mmcap.accel import timing


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MMCAP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing.OtherLoad, "others_competed", lambda self: False)  # a quiet machine
    timing.forget()
    yield tmp_path / timing.CACHE_FILE
    timing.forget()


def race_returning(seconds, calls):
    def race():
        calls.append(1)
        return seconds
    return race


def test_time_calls_alternates_and_keeps_each_minimum(monkeypatch):
    order, clock = [], iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    out = timing.time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3)
    assert order == ["a", "b"] * 4  # a warm-up round, then three alternating rounds
    assert out == {"a": 1.0, "b": 1.0}


def test_a_choice_is_timed_once_per_machine_and_shape_then_reused(cache):
    calls = []
    assert timing.fastest("op 4 x 4", ["x", "y"], race_returning({"x": 2.0, "y": 1.0}, calls)) == "y"
    assert timing.fastest("op 4 x 4", ["x", "y"], race_returning({"x": 1.0, "y": 2.0}, calls)) == "y"
    assert len(calls) == 1
    timing.forget()  # a new process: reads the file, runs no race
    assert timing.fastest("op 4 x 4", ["x", "y"], lambda: pytest.fail("raced again")) == "y"
    saved = json.loads(cache.read_text())[timing.machine_key()]
    assert saved["op 4 x 4"] == {"use": "y", "seconds": {"x": 2.0, "y": 1.0}}
    # another shape is another choice
    assert timing.fastest("op 8 x 8", ["x", "y"], race_returning({"x": 1.0, "y": 2.0}, calls)) == "x"
    assert len(calls) == 2 and timing.choices() == {"op 4 x 4": "y", "op 8 x 8": "x"}


def test_prefer_keeps_the_first_unless_another_is_clearly_faster(cache):
    assert timing.fastest("a", ["p", "q"], lambda: {"p": 1.0, "q": 0.95}, prefer="p", margin=1.1) == "p"
    assert timing.fastest("b", ["p", "q"], lambda: {"p": 1.0, "q": 0.5}, prefer="p", margin=1.1) == "q"


@pytest.mark.parametrize("content", [
    "{not json",  # a half-written or damaged file
    json.dumps([1, 2]),  # not an object
    "MACHINE_WITH_BAD_ENTRY",  # the entry for this machine is not a choice
    "MACHINE_WITH_GONE_CANDIDATE",  # it names a candidate not offered now (e.g. onnxruntime removed)
])
def test_a_stale_or_corrupt_cache_is_timed_again(cache, content):
    machine = timing.machine_key()
    if content == "MACHINE_WITH_BAD_ENTRY":
        content = json.dumps({machine: {"op": {"use": 3}}})
    elif content == "MACHINE_WITH_GONE_CANDIDATE":
        content = json.dumps({machine: {"op": {"use": "onnxruntime", "seconds": {"onnxruntime": 0.1}}}})
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(content)
    calls = []
    assert timing.fastest("op", ["x", "y"], race_returning({"x": 1.0, "y": 2.0}, calls)) == "x"
    assert calls == [1]
    assert json.loads(cache.read_text())[machine]["op"]["use"] == "x"  # and the file is whole again


def test_another_machine_or_version_never_reuses_a_choice(cache, monkeypatch):
    timing.fastest("op", ["x", "y"], lambda: {"x": 1.0, "y": 2.0})
    timing.forget()
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 64)  # other thread count: another key
    calls = []
    assert timing.fastest("op", ["x", "y"], race_returning({"x": 2.0, "y": 1.0}, calls)) == "y" and calls


def test_a_choice_timed_under_other_processes_load_is_not_kept(cache, monkeypatch):
    """Timed while other processes took the cores: used by this process, not written for the next."""
    monkeypatch.setattr(timing.OtherLoad, "others_competed", lambda self: True)
    assert timing.fastest("op", ["x", "y"], lambda: {"x": 2.0, "y": 1.0}) == "y"
    assert timing.fastest("op", ["x", "y"], lambda: pytest.fail("raced again in one process")) == "y"
    assert not cache.exists()
    timing.forget()  # the next process
    monkeypatch.setattr(timing.OtherLoad, "others_competed", lambda self: False)
    calls = []
    assert timing.fastest("op", ["x", "y"], race_returning({"x": 1.0, "y": 2.0}, calls)) == "x" and calls
    assert json.loads(cache.read_text())[timing.machine_key()]["op"]["use"] == "x"


def test_other_load_counts_other_processes_cpu_not_this_ones(monkeypatch):
    """/proc/stat's busy time less this process's own, over the wall clock, against the spare cores."""
    reads = iter([(100.0, 10.0, 0.0), (103.0, 11.0, 2.0)])  # 3 s busy in all, 1 s of it ours, in 2 s
    monkeypatch.setattr(timing.OtherLoad, "_read", staticmethod(lambda: next(reads)))
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 2)
    load = timing.OtherLoad()
    load._read = lambda: (103.0, 11.0, 2.0)
    assert load.cores() == 1.0 and load.others_competed()  # 1 core of others against 0 spare + 0.5
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 8)
    assert not load.others_competed()  # six spare cores absorb it


def test_a_choice_that_did_not_time_a_new_candidate_is_raced_again(cache):
    """A cached choice from before a candidate existed (a new kernel) is timed again with it."""
    timing.fastest("op", ["x", "y"], lambda: {"x": 1.0, "y": 2.0})
    timing.forget()
    calls = []
    assert timing.fastest("op", ["x", "y", "z"], race_returning({"x": 1.0, "y": 2.0, "z": 0.5}, calls)) == "z"
    assert calls
    timing.forget()
    assert timing.fastest("op", ["x", "y", "z"], lambda: pytest.fail("raced again")) == "z"
