"""bench_caption's mmcap figure for two source trees, back to back on this machine: the median of
`--runs` alternating runs each, and their ratio.

    git worktree add /tmp/mmcap-before <commit>       # the code to compare against
    python benchmarks/bench_caption_versions.py --before /tmp/mmcap-before   # ~1 min per run
    python benchmarks/bench_caption_versions.py --before /tmp/mmcap-before --emulate xeon-without-amx

Every run is a fresh process (PYTHONPATH = the tree) with a fresh `MMCAP_CACHE_DIR`, so each tree
compiles its own kernels and times its own choices on this machine, as a user's first install
would; the runs alternate (before, after, before, ...) so that drift in the machine's speed hits
both alike. A run is bench_caption's mmcap system with its settings unchanged: `Captioner.caption`
of the same 48 JPEG photos in batches of 16, beam 3, exactly 20 new tokens, `--precision` (int8),
the model of `models.build_mmcap`, each batch's best time over two rounds after a warm-up. The
photos and the model come from this tree's `benchmarks/`, for both. `--emulate` runs both trees
on another kind of CPU's instruction sets (`emulate_cpu.py`: the kernels' -march, oneDNN's cap).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from emulate_cpu import KINDS

HERE = Path(__file__).resolve().parent

ONE_RUN = r"""
import json, sys, tempfile, time
from pathlib import Path
# the tree on PYTHONPATH, not an editable install's (its finder runs before sys.path: the README installs so)
sys.meta_path = [f for f in sys.meta_path if "editable" not in (getattr(f, "__name__", "") + type(f).__module__
                                                                 + getattr(f, "__module__", "")).lower()]
sys.path.insert(0, sys.argv[1])
from models import GENERATION, build_mmcap
from photos import make_photos
import mmcap
n, batch_size, precision, march = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if march:  # emulate_cpu.py's kind: mmcap's kernels built for its -march (oneDNN's cap is in the environment)
    from mmcap.accel import kernels
    kernels.FLAGS[:] = [f"-march={march}" if flag == "-march=native" else flag for flag in kernels.FLAGS]
paths = [str(p) for p in make_photos(Path(tempfile.mkdtemp(prefix="mmcap-versions-")), n)]
batches = [paths[i : i + batch_size] for i in range(0, n, batch_size)]
model = build_mmcap()
model.caption(batches[0], batch_size=batch_size, precision=precision, **GENERATION)  # warm-up: builds, races
best = [float("inf")] * len(batches)
for _ in range(2):
    for j, batch in enumerate(batches):
        t0 = time.perf_counter()
        model.caption(batch, batch_size=batch_size, precision=precision, **GENERATION)
        best[j] = min(best[j], time.perf_counter() - t0)
print(json.dumps({"captions_per_s": n / sum(best), "mmcap_file": mmcap.__file__}))
"""


def one_run(src: Path, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mmcap-cache-") as cache:
        env = {**os.environ, "PYTHONPATH": str(src), "MMCAP_CACHE_DIR": cache}
        march = ""
        if args.emulate:
            march, env["ONEDNN_MAX_CPU_ISA"] = KINDS[args.emulate]
        done = subprocess.run([sys.executable, "-c", ONE_RUN, str(HERE), str(args.n), str(args.batch_size),
                               args.precision, march], env=env, capture_output=True, text=True,
                              cwd=tempfile.gettempdir())
    if done.returncode:
        raise SystemExit(f"a run of {src} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out["mmcap_file"]).resolve().is_relative_to(src.resolve()), f"imported {out['mmcap_file']}, not {src}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the source tree to compare against (a checkout holding mmcap/)")
    p.add_argument("--after", default=str(HERE.parent), help="the source tree measured (default: this one)")
    p.add_argument("--runs", type=int, default=3, help="runs per tree (default 3; the median counts)")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="int8")
    p.add_argument("--emulate", choices=sorted(KINDS),
                   help="both trees limited to another kind of CPU's instruction sets, as emulate_cpu.py does")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from measure import emit, log

    trees = {"before": Path(args.before), "after": Path(args.after)}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.runs):
        for name, src in trees.items():
            rates[name].append(one_run(src, args)["captions_per_s"])
            log(f"run {r}: {name} {rates[name][-1]:.2f} captions/s")
    median = {name: statistics.median(v) for name, v in rates.items()}
    emit({"before": str(trees["before"]), "after": str(trees["after"]),
          **{f"{name}_captions_per_s": [round(x, 2) for x in v] for name, v in rates.items()},
          **{f"{name}_median": round(m, 3) for name, m in median.items()},
          "after_over_before": round(median["after"] / median["before"], 3),
          "precision": args.precision, "n": args.n, "batch_size": args.batch_size, "emulated_cpu": args.emulate})
    return 0


if __name__ == "__main__":
    sys.exit(main())
