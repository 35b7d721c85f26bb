"""`mmcap caption --output` over folders of photo-like 640x480 JPEG files: peak memory and speed.

    python benchmarks/bench_caption_files.py                       # 300, 3,000 and 10,000 files x 0, 1, 2 workers
    python benchmarks/bench_caption_files.py --sizes 300 1000 --workers 2

The model has bench_caption's shape (ResNet-50 @224 + a GPT-2-small-shaped decoder, random
weights, beam 3, exactly 20 new tokens, batch 16; `models.build_mmcap`), saved once. Each run is
the real command in a fresh process; per run it reports:

- `captions_per_s`: from the command's own summary line (captioning only, model loading excluded);
- `vs_model_alone`: that over the model alone captioning pre-decoded tensors in this process
  (`Captioner.caption` on a tensor batch, same precision and options), measured before and after
  the runs (the mean of the two), so that other load on the machine hits both alike;
- `peak_rss_mb`: the largest peak resident memory of the command's processes (`wait4`).

The last JSON line sums up: RSS growth from the smallest to the largest folder (target: at most
150 MB from 300 to 10,000 files) and the speed ratio with 2 workers (target: at least 0.9).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from measure import emit, log
from models import BATCH_SIZE, GENERATION, build_mmcap
from photos import make_photos

from mmcap import Captioner
from mmcap.images import eval_transform, open_image

GENERATION_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in GENERATION.items()]
SUMMARY = re.compile(r"(\d+) captioned, (\d+) failed.* in ([\d.]+) s \(([\d.]+) images/s\)")


def prepare(root: Path, sizes: list[int]) -> tuple[Path, dict[int, Path]]:
    """The saved model and a folder per size (links to the first N of one set of photos)."""
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        log("building and saving the model")
        build_mmcap().save_pretrained(model_dir)
    photos = root / "photos"
    have = len(list(photos.glob("*.jpg"))) if photos.is_dir() else 0
    if have < max(sizes):
        log(f"writing {max(sizes)} photos")
        make_photos(photos, max(sizes))
    folders = {}
    for n in sizes:
        folder = root / f"files_{n}"
        if not folder.is_dir():
            folder.mkdir()
            for path in sorted(photos.glob("*.jpg"))[:n]:
                (folder / path.name).symlink_to(path.resolve())  # absolute: --root may be relative
        folders[n] = folder
    return model_dir, folders


def run_caption(model_dir: Path, folder: Path, workers: int, precision: str, output: Path) -> dict:
    """One `mmcap caption --output` run in a fresh process: its summary figures and peak RSS."""
    output.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mmcap.cli", "caption", "--model", str(model_dir), "--output", str(output),
           "--num-workers", str(workers), "--batch-size", str(BATCH_SIZE), "--precision", precision,
           *GENERATION_ARGS, str(folder)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    match = SUMMARY.search(err)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    captioned, failed, seconds, rate = match.groups()
    return {"captioned": int(captioned), "failed": int(failed), "caption_seconds": float(seconds),
            "captions_per_s": float(rate), "wall_seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # KiB on Linux: the largest of the processes


@torch.no_grad()
def model_alone(model_dir: Path, folder: Path, precision: str, batches: int) -> float:
    """Captions/s of the model on pre-decoded tensors (one warm-up batch first)."""
    model = Captioner.from_pretrained(model_dir)
    transform = eval_transform(model.config.image_size)
    paths = sorted(folder.glob("*.jpg"))[: (batches + 1) * BATCH_SIZE]
    pixels = torch.stack([transform(open_image(p)) for p in paths])
    model.caption(pixels[:BATCH_SIZE], batch_size=BATCH_SIZE, precision=precision, **GENERATION)
    started = time.perf_counter()
    model.caption(pixels[BATCH_SIZE:], batch_size=BATCH_SIZE, precision=precision, **GENERATION)
    return (len(pixels) - BATCH_SIZE) / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 3000, 10000])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto", "int8"])
    p.add_argument("--baseline-batches", type=int, default=3, help="batches timed for the model alone")
    p.add_argument("--root", default=None, help="keep photos and model here between runs (default: a temp dir)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmcap-bench-files-") as tmp:
        root = Path(args.root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        model_dir, folders = prepare(root, args.sizes)
        smallest = folders[min(args.sizes)]
        before = model_alone(model_dir, smallest, args.precision, args.baseline_batches)
        log(f"model alone: {before:.2f} captions/s")
        runs = []
        for n in args.sizes:
            for workers in args.workers:
                log(f"mmcap caption: {n} files, {workers} workers")
                result = run_caption(model_dir, folders[n], workers, args.precision, root / "captions.jsonl")
                runs.append({"files": n, "num_workers": workers, **result})
                log(runs[-1])
        after = model_alone(model_dir, smallest, args.precision, args.baseline_batches)
        alone = (before + after) / 2
        for run in runs:
            run["vs_model_alone"] = round(run["captions_per_s"] / alone, 3)
            emit({"benchmark": "caption_files", "precision": args.precision, **run})
        rss = {(r["files"], r["num_workers"]): r["peak_rss_mb"] for r in runs}
        growth = {w: round(rss[(max(args.sizes), w)] - rss[(min(args.sizes), w)], 1) for w in args.workers}
        two = [r["vs_model_alone"] for r in runs if r["num_workers"] == 2]
        emit({"benchmark": "caption_files_summary", "precision": args.precision, "sizes": args.sizes,
              "model_alone_captions_per_s": [round(before, 2), round(after, 2)],
              "rss_growth_mb_by_workers": growth, "vs_model_alone_2_workers": two,
              "targets": {"rss_growth_mb": 150, "vs_model_alone_2_workers": 0.9}})


if __name__ == "__main__":
    main()
