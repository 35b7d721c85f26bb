"""Samples/s through the training data pipeline, printed as one JSON line.

    python benchmarks/bench_data.py [--demo-dir data/demo] [--samples 3000] [--workers 0 1 2]

Two datasets: the demo shards (128 px JPEGs; generated into a temp dir unless --demo-dir holds
them) and shards of 256 x 256 photo-like JPEGs made here (`photos.photo_jpeg`, the photos of
bench_caption at a smaller size). Each is read through
`CaptionDataModule.train_dataloader()` (decode, random crop, normalise, batch) with 0, 1 and 2
DataLoader workers. `--train-step` adds what `bench_train_step` reports: the hook where the
training code measures the samples/s a demo training step consumes.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from measure import emit
from photos import photo_jpeg

from mmcap.data import CaptionDataModule, Sample, write_shards
from mmcap.data.demo import demo_is_complete, make_demo


def photo_shards(out: Path, n: int, side: int = 256, per_shard: int = 500) -> str:
    """Shards of photo-like JPEGs: about the size and decode cost of real photos."""
    rng = np.random.default_rng(0)
    samples = [Sample(f"photo{i:06d}", photo_jpeg(rng, (side, side)), [f"a photo number {i}"]) for i in range(n)]
    write_shards(samples, str(out / "photo-%06d.tar"), maxcount=per_shard, progress=False)
    return str(out / "photo-*.tar")


def samples_per_second(shards: str, image_size: int, batch_size: int, workers: int, limit: int) -> float:
    dm = CaptionDataModule(train_shards=shards, image_size=image_size, batch_size=batch_size, num_workers=workers,
                           shuffle_buffer=1000)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches)  # workers started, shuffle buffer filled
    started, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch["keys"])
        if seen >= limit:
            break
    elapsed = time.perf_counter() - started
    batches.close()  # shut the workers down now, not in some later fork
    return round(seen / elapsed, 1)


def bench_train_step(demo_shards: str, args: argparse.Namespace) -> Optional[dict]:
    """HOOK for the training code: samples/s that one demo training step consumes (model forward,
    backward, optimiser step on the demo batch size), to set against the loader's rate."""
    return None


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-dir", help="existing demo data (default: generate into a temp dir)")
    p.add_argument("--samples", type=int, default=3000, help="samples timed per measurement")
    p.add_argument("--photos", type=int, default=2000, help="256 px JPEGs to make")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--demo-image-size", type=int, default=128)
    p.add_argument("--photo-image-size", type=int, default=224)
    p.add_argument("--train-step", action="store_true", help="also run bench_train_step (training hook)")
    args = p.parse_args(argv)

    result: dict = {"batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        demo_dir = Path(args.demo_dir) if args.demo_dir else Path(tmp) / "demo"
        if not demo_is_complete(demo_dir):
            started = time.perf_counter()
            make_demo(demo_dir)
            result["demo_generate_s"] = round(time.perf_counter() - started, 2)
        photos = photo_shards(Path(tmp) / "photos", args.photos)
        datasets = {
            "demo": (str(demo_dir / "train-*.tar"), args.demo_image_size),
            "jpeg256": (photos, args.photo_image_size),
        }
        for name, (shards, size) in datasets.items():
            result[name] = {"image_size": size}
            for w in args.workers:
                result[name][f"workers_{w}"] = samples_per_second(shards, size, args.batch_size, w, args.samples)
        if args.train_step:
            result["train_step"] = bench_train_step(datasets["demo"][0], args)
    return emit(result)


if __name__ == "__main__":
    main()
