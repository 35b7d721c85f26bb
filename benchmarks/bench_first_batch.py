"""What a new process pays on its first int8 batch: the races that choose the fast paths and the int8
encoder's calibration, with and without this machine's cached choices.

    python benchmarks/bench_first_batch.py                           # this checkout
    python benchmarks/bench_first_batch.py --mmcap-src ../mmcap_0_2  # another checkout (e.g. 0.2.0)

The model has bench_caption's shape (ResNet-50 @224 + a GPT-2-small-shaped decoder, random weights,
beam 3, exactly 20 new tokens) on 16 photo-like JPEGs. Each row is a fresh process that loads the
model and captions the 16 images twice with `precision="int8"`:
- `first_batch_s` and `second_batch_s`: the two calls;
- `races_s`: time spent timing candidates (0.3: `mmcap.accel.timing.time_calls`; 0.2: its four
  race functions); `calibration_s`: the int8 encoder's calibration pass.
Rows: `cold` runs with no cached choice (the attention kernels already built, as on any machine
after its first run); `warm` runs right after it, with whatever the cold process left cached.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import emit, log
from models import GENERATION, build_mmcap
from photos import make_photos

CHILD = r"""
import json, sys, time, functools
import torch
model_dir, photos = sys.argv[1], sys.argv[2:]
spent = {"races_s": 0.0, "calibration_s": 0.0}

def timed(module, name, key):
    real = getattr(module, name)
    @functools.wraps(real)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent[key] += time.perf_counter() - t
    setattr(module, name, wrapper)

try:  # 0.3
    from mmcap.accel import timing, int8_encoder
    timed(timing, "time_calls", "races_s")
except ImportError:  # 0.2
    from mmcap import precision, quantize, encoder_runners, gpt2_attention, int8_encoder
    timed(precision, "measure_matmuls", "races_s")
    timed(quantize, "_time_engine", "races_s")
    timed(encoder_runners, "_time", "races_s")
    timed(gpt2_attention, "_timings", "races_s")
real_init = int8_encoder.Int8ResNet.__init__
def init(self, *a, **k):
    t = time.perf_counter()
    real_init(self, *a, **k)
    spent["calibration_s"] += time.perf_counter() - t
int8_encoder.Int8ResNet.__init__ = init
from mmcap import Captioner
model = Captioner.from_pretrained(model_dir)
options = json.loads(sys.stdin.read())
out = {}
for name in ("first_batch_s", "second_batch_s"):
    t = time.perf_counter()
    model.caption(photos, batch_size=16, precision="int8", **options)
    out[name] = round(time.perf_counter() - t, 3)
out.update({k: round(v, 3) for k, v in spent.items()})
print(json.dumps(out))
"""


def run_child(src: str | None, model_dir: Path, photos: list[Path], cache: Path) -> dict:
    env = {**os.environ, "MMCAP_CACHE_DIR": str(cache)}
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve())
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), *map(str, photos)], env=env,
                         input=json.dumps(GENERATION), capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mmcap-src", help="a checkout whose mmcap/ to run (default: the installed one)")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "mmcap_bench_first_batch"))
    args = p.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        log("building and saving the model")
        build_mmcap().save_pretrained(model_dir)
    photos = sorted((root / "photos").glob("*.jpg")) or make_photos(root / "photos", 16)
    cache = root / ("cache_" + (Path(args.mmcap_src).name if args.mmcap_src else "this"))
    log("warming up: builds the attention kernels once")
    run_child(args.mmcap_src, model_dir, photos[:16], cache)
    for name in ("choices.json", "precision.json"):
        (cache / name).unlink(missing_ok=True)
    rows = {"cold": run_child(args.mmcap_src, model_dir, photos[:16], cache)}
    rows["warm"] = run_child(args.mmcap_src, model_dir, photos[:16], cache)
    emit({"bench": "first_batch", "mmcap_src": args.mmcap_src or "installed", **rows})


if __name__ == "__main__":
    main()
