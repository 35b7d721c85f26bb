"""Every notebook at its own defaults, timed cell by cell: the issue's budget is at most 180 s per
notebook, top to bottom, and at most 120 s for any cell, on a 2-core CPU.

    python benchmarks/bench_notebooks.py                 # all of notebooks/, in order (about 6-9 minutes on 2 cores)
    python benchmarks/bench_notebooks.py 04_language_models.ipynb
    python benchmarks/bench_notebooks.py --root .        # in place, as a reader runs them

The notebooks run as `tests/test_notebooks.py` runs them (nbclient, the python3 kernel, the
notebooks' folder as working directory), but with none of the test's small settings: every
`MMCAP_NB_*` variable is removed from the kernel's environment except `MMCAP_NB_ROOT`, which only
says where data and models go. By default that is a fresh temporary folder, so that each run is a
newcomer's first: notebook 01 makes the demo data and trains the model that 02 and 03 load (run
02 or 03 alone with `--root` pointing at a folder where 01 has run). `--root .` runs them where a
reader would, `..` from notebooks/: the repository's data/demo and runs/notebook/model.

Printed: the processor (`model name` in /proc/cpuinfo) and the CPUs this process may use; per
notebook the seconds of each code cell and the total (kernel start included), with `OVER` beside
any notebook over 180 s or cell over 120 s; last, one JSON line with the same figures. The exit
status is 1 when a notebook fails or is over budget. The notebooks on disk are never written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_BUDGET_S, CELL_BUDGET_S = 180.0, 120.0
ROOT_VARIABLE = "MMCAP_NB_ROOT"


def processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def first_line(source: str) -> str:
    lines = [line for line in source.splitlines() if line.strip() and not line.startswith("%")]
    text = lines[0].strip() if lines else ""
    return text if len(text) <= 60 else text[:57] + "..."


def run(path: Path, timeout: int) -> dict:
    """Execute one notebook in memory; the seconds of each code cell and of the whole run."""
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    cells, error = [], None
    started = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(book.cells):
            if cell.cell_type != "code":
                continue
            began = time.perf_counter()
            try:
                client.execute_cell(cell, index)
            except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.CellTimeoutError) as e:
                error = f"cell {index}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
            cells.append({"cell": index, "s": round(time.perf_counter() - began, 1),
                          "source": first_line(cell.source)})
            if error:
                break
    total = time.perf_counter() - started
    return {"notebook": path.name, "total_s": round(total, 1), "cells": cells, "error": error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="names in notebooks/ (default: all, in order)")
    parser.add_argument("--root", help="MMCAP_NB_ROOT for the notebooks (default: a fresh temporary folder)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before a cell is stopped")
    args = parser.parse_args()

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

    print(f"processor: {processor()}; {cpus()} CPUs usable; Python {platform.python_version()}")
    print(f"{ROOT_VARIABLE}={root}; budget: {NOTEBOOK_BUDGET_S:.0f} s a notebook, {CELL_BUDGET_S:.0f} s a cell\n",
          flush=True)
    results, failed = [], False
    try:
        for path in paths:
            result = run(path, args.timeout)
            results.append(result)
            print(path.name)
            for cell in result["cells"]:
                over = "  OVER" if cell["s"] > CELL_BUDGET_S else ""
                print(f"  [{cell['cell']:2}] {cell['s']:7.1f} s  {cell['source']}{over}")
            slowest = max(result["cells"], key=lambda c: c["s"]) if result["cells"] else None
            over = result["total_s"] > NOTEBOOK_BUDGET_S or (slowest and slowest["s"] > CELL_BUDGET_S)
            result["over_budget"] = bool(over)
            failed |= bool(over or result["error"])
            print(f"  total {result['total_s']:.1f} s (kernel start included)"
                  + (f"; slowest cell [{slowest['cell']}] {slowest['s']:.1f} s" if slowest else "")
                  + ("  OVER BUDGET" if over else "") + (f"  FAILED: {result['error']}" if result["error"] else ""))
            print(flush=True)
    finally:
        if temporary is not None:
            temporary.cleanup()
    print(json.dumps({"benchmark": "notebooks", "processor": processor(), "cpus": cpus(),
                      "budget_s": {"notebook": NOTEBOOK_BUDGET_S, "cell": CELL_BUDGET_S},
                      "notebooks": [{k: r[k] for k in ("notebook", "total_s", "over_budget", "error")}
                                    | {"cells_s": {str(c["cell"]): c["s"] for c in r["cells"]}} for r in results],
                      "ok": not failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
