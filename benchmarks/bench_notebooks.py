"""Every notebook at its own defaults, timed cell by cell: the issue's budget is at most 180 s per
notebook, top to bottom, and at most 120 s for any cell, on a 2-core CPU.

    python benchmarks/bench_notebooks.py                 # all of notebooks/, in order
    python benchmarks/bench_notebooks.py 04_language_models.ipynb
    python benchmarks/bench_notebooks.py --root .        # in place, as a reader runs them
    python benchmarks/bench_notebooks.py --threads 1     # on a busy machine (see below)

The notebooks run as `tests/test_notebooks.py` runs them (nbclient, the python3 kernel, the
notebooks' folder as working directory), but with none of the test's small settings: every
`MMCAP_NB_*` variable is removed from the kernel's environment except `MMCAP_NB_ROOT`, which only
says where data and models go. By default that is a fresh temporary folder, so that each run is a
newcomer's first: notebook 01 makes the demo data and trains the model that 02 and 03 load (run
02 or 03 alone with `--root` pointing at a folder where 01 has run). `--root .` runs them where a
reader would, `..` from notebooks/: the repository's data/demo and runs/notebook/model.

On a machine shared with other work, torch's two threads per kernel slow down far more than the
load suggests (each waits for the other at every operation while either is descheduled):
`--threads 1` shows what the notebooks cost without that: about an upper bound for an idle 2-core CPU.

Printed: the processor (`model name` in /proc/cpuinfo), the CPUs this process may use and the
load average; per notebook the wall seconds of each code cell (and the CPU seconds its kernel
used meanwhile, waited-for child processes included) and the total (kernel start included), with `OVER` beside any notebook over 180 s or cell over
120 s; last, one JSON line with the same figures. The exit status is 1 when a notebook fails or
is over budget. The notebooks on disk are never written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import nbclient
import nbformat

from mmcap.accel.timing import cpu_model

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_BUDGET_S, CELL_BUDGET_S = 180.0, 120.0
ROOT_VARIABLE = "MMCAP_NB_ROOT"


def processor() -> str:
    return cpu_model()


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def kernel_cpu_s(client) -> Optional[float]:
    """CPU seconds the kernel process and its waited-for children (DataLoader workers) have used."""
    process = getattr(getattr(getattr(client, "km", None), "provisioner", None), "process", None)
    try:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (AttributeError, OSError):
        return None
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def first_line(source: str) -> str:
    lines = [line for line in source.splitlines() if line.strip() and not line.startswith("%")]
    text = lines[0].strip() if lines else ""
    return text if len(text) <= 60 else text[:57] + "..."


def cell_line(cell: dict) -> str:
    cpu = f"{cell['cpu_s']:7.1f}" if cell["cpu_s"] is not None else "      ?"
    over = "  OVER" if cell["s"] > CELL_BUDGET_S else ""
    return f"  [{cell['cell']:2}] {cell['s']:7.1f} s  (cpu {cpu} s)  {cell['source']}{over}"


def run(path: Path, timeout: int) -> dict:
    """Execute one notebook in memory, printing each code cell's seconds as it finishes."""
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    print(path.name, flush=True)
    cells, error = [], None
    started = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(book.cells):
            if cell.cell_type != "code":
                continue
            began, cpu = time.perf_counter(), kernel_cpu_s(client)
            try:
                client.execute_cell(cell, index)
            except nbclient.exceptions.CellTimeoutError:
                error = f"cell {index}: stopped after --timeout {timeout} s"
            except nbclient.exceptions.CellExecutionError as e:
                error = f"cell {index}: {e.ename}: {e.evalue}"
            after = kernel_cpu_s(client)
            cells.append({"cell": index, "s": round(time.perf_counter() - began, 1),
                          "cpu_s": round(after - cpu, 1) if None not in (cpu, after) else None,
                          "source": first_line(cell.source)})
            print(cell_line(cells[-1]), flush=True)
            if error:
                break
    total = time.perf_counter() - started
    slowest = max(cells, key=lambda c: c["s"]) if cells else None
    over = total > NOTEBOOK_BUDGET_S or bool(slowest and slowest["s"] > CELL_BUDGET_S)
    print(f"  total {total:.1f} s (kernel start included)"
          + (f"; slowest cell [{slowest['cell']}] {slowest['s']:.1f} s" if slowest else "")
          + f"; load average after {load()}"
          + ("  OVER BUDGET" if over else "") + (f"  FAILED: {error}" if error else "") + "\n", flush=True)
    return {"notebook": path.name, "total_s": round(total, 1), "over_budget": over, "error": error,
            "slowest_cell": slowest and {k: slowest[k] for k in ("cell", "s")},
            "cells_s": {str(c["cell"]): c["s"] for c in cells}, "load": load()}


def stop(signum, frame):
    raise KeyboardInterrupt  # a terminated run still shuts its kernel down


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="names in notebooks/ (default: all, in order)")
    parser.add_argument("--root", help="MMCAP_NB_ROOT for the notebooks (default: a fresh temporary folder)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before a cell is stopped")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the kernels (default: torch's own choice)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop)

    paths = [NOTEBOOKS / n for n in args.notebooks] if args.notebooks else sorted(NOTEBOOKS.glob("*.ipynb"))
    for name in [k for k in os.environ if k.startswith("MMCAP_NB_")]:
        os.environ.pop(name)  # the kernel inherits this environment: the notebooks' defaults only
    temporary = None
    if args.root is None:
        temporary = tempfile.TemporaryDirectory(prefix="bench_notebooks_")
        root = temporary.name
    else:
        root = os.path.abspath(args.root) if args.root != "." else str(NOTEBOOKS.parent)
    os.environ[ROOT_VARIABLE] = root
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    print(f"processor: {processor()}; {cpus()} CPUs usable; load average {load()} (1/5/15 min); "
          f"Python {platform.python_version()}")
    print(f"{ROOT_VARIABLE}={root}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}; budget: {NOTEBOOK_BUDGET_S:.0f} s a notebook, {CELL_BUDGET_S:.0f} s a cell\n",
          flush=True)
    results = []
    try:
        for path in paths:
            results.append(run(path, args.timeout))
    finally:
        if temporary is not None:
            temporary.cleanup()
    ok = not any(r["over_budget"] or r["error"] for r in results)
    print(json.dumps({"benchmark": "notebooks", "processor": processor(), "cpus": cpus(),
                      "budget_s": {"notebook": NOTEBOOK_BUDGET_S, "cell": CELL_BUDGET_S},
                      "notebooks": results, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
