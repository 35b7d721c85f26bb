"""Timing candidates and keeping the fastest: the one helper every fast path's choice goes through,
and the per-machine cache of what it chose.

The statistic is each candidate's minimum over `repeats` rounds, the candidates alternating within
a round after one warm-up call each. The minimum, because other processes only ever add time: the
fastest of several runs is the best estimate of what the code itself costs. Alternating, because a
burst of other load then slows every candidate, not just the one running at the time.

Choices outlive the process: they are kept in `choices.json` under `cache_root()`
(`MMCAP_CACHE_DIR`, default `~/.cache/mmcap`), keyed by the machine (processor, thread count, torch
and mmcap versions) and by what was timed, shape included, so that a choice made for a ResNet-18
is never reused for a ResNet-50. A new process reuses them and runs no race. An entry that cannot be
read, that names a candidate not offered now, or that did not time a candidate offered now, is
timed again, never trusted blindly. A race run while other processes competed for the cores
mmcap's threads use (`OtherLoad`, from /proc/stat) decides for this process only and is not
written: a choice timed under someone else's load would otherwise outlive the load (it once kept a
kernel 2x slower on every later run).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

log = logging.getLogger(__name__)

CACHE_FILE = "choices.json"
_CHOSEN: dict[tuple[str, str], dict] = {}  # (machine, what) -> entry, this process's memo of the file


def cpu_model() -> str:
    """The processor's model name (`lscpu`'s "Model name"), for cache keys, logs and benchmarks."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    from mmcap import __version__

    return f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__} | mmcap {__version__}"


def cache_root() -> Path:
    """Where mmcap keeps what it measured or built for this machine (`MMCAP_CACHE_DIR`)."""
    return Path(os.environ.get("MMCAP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmcap"))


def time_calls(candidates: Mapping[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Seconds per call of each candidate: the minimum over `repeats` alternating rounds, after a warm-up."""
    best = {name: float("inf") for name in candidates}
    with torch.no_grad():
        for r in range(repeats + 1):
            for name, call in candidates.items():
                start = time.perf_counter()
                call()
                took = time.perf_counter() - start
                if r:  # round 0 warms up: kernel selection, page faults, lazy packing
                    best[name] = min(best[name], took)
    return {name: max(t, 1e-9) for name, t in best.items()}


def fastest(what: str, names: Sequence[str], race: Callable[[], Mapping[str, float]],
            prefer: Optional[str] = None, margin: float = 1.0) -> str:
    """The fastest of `names` for `what` (the operation and shape timed): this machine's cached
    choice where it names one of `names`, else the winner of `race()` (seconds per name), which is
    then cached. `prefer` is kept unless another candidate is faster by the factor `margin`."""
    names = list(names)
    if len(names) == 1:
        return names[0]
    entry = choice(what)
    # reused where it names a candidate and timed every candidate offered now (a candidate added
    # since, such as a new kernel, is raced)
    if entry is not None and entry.get("use") in names and set(names) <= set(entry["seconds"]):
        return entry["use"]
    load = OtherLoad()
    seconds = dict(race())
    use = min(seconds, key=seconds.get)
    if prefer is not None and prefer in seconds and seconds[use] * margin > seconds[prefer]:
        use = prefer
    log.info("mmcap: %s: %s (%s)", what, use, ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in seconds.items()))
    if load.others_competed():
        log.info("mmcap: %s: timed while other processes used %.1f cores: kept for this process only",
                 what, load.cores())
        _CHOSEN[machine_key(), what] = {"use": use, "seconds": seconds}
    else:
        _store(what, {"use": use, "seconds": seconds})
    return use


class OtherLoad:
    """CPU time that other processes used from construction on (Linux's /proc/stat; none elsewhere)."""

    SLACK_S = 0.02  # /proc/stat counts in 10 ms ticks: two ticks of other work are noise

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read() -> Optional[tuple[float, float, float]]:
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            tick = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        mine = os.times()
        # all CPUs' busy time (all but idle and iowait), this process's own, and the wall clock
        return (sum(fields) - fields[3] - fields[4]) / tick, mine.user + mine.system, time.perf_counter()

    def _others(self) -> tuple[float, float]:
        end = self._read()
        if self._start is None or end is None:
            return 0.0, 1.0
        (busy0, mine0, t0), (busy1, mine1, t1) = self._start, end
        return max(0.0, (busy1 - busy0) - (mine1 - mine0)), max(t1 - t0, 1e-9)

    def cores(self) -> float:
        """Cores that other processes kept busy, on average."""
        others, wall = self._others()
        return others / wall

    def others_competed(self) -> bool:
        """Whether other processes used more than the cores this process's threads leave free, plus half a core."""
        others, wall = self._others()
        spare = max(0, (os.cpu_count() or 1) - torch.get_num_threads())
        return others > (spare + 0.5) * wall + self.SLACK_S


def choice(what: str) -> Optional[dict]:
    """This machine's cached entry for `what` (`{"use": name, "seconds": {name: s}}`), or None
    where there is none or it is unreadable."""
    key = (machine_key(), what)
    if key not in _CHOSEN:
        entry = _read(_path()).get(key[0], {}).get(what)
        if not (isinstance(entry, dict) and isinstance(entry.get("use"), str)
                and isinstance(entry.get("seconds"), dict)):
            return None
        _CHOSEN[key] = entry
    return _CHOSEN[key]


def choices() -> dict[str, str]:
    """What this process chose or reused, {what: name}, for logs and benchmarks."""
    machine = machine_key()
    return {what: entry["use"] for (m, what), entry in _CHOSEN.items() if m == machine}


def forget() -> None:
    """Drop this process's memo (the file stays): the next lookup reads the file again."""
    _CHOSEN.clear()


def _path() -> Path:
    return cache_root() / CACHE_FILE


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(what: str, entry: dict) -> None:
    """Memo and file; the file best effort (a read-only home just times again next time), written
    to a temporary file and renamed, so a reader never sees half of it."""
    machine = machine_key()
    _CHOSEN[machine, what] = entry
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        if not isinstance(data.get(machine), dict):
            data[machine] = {}
        data[machine][what] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".choices-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot cache the timed choice in %s: %s", path, e)
