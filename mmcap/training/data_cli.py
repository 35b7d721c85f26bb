"""`mmcap shards ...` (write shards from COCO, Karpathy splits, tables, folders), `mmcap features`
(precomputed encoder grids) and `mmcap data demo`."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from mmcap.data.shards import WriteSummary, write_shards
from mmcap.data.sources import coco_samples, folder_samples, karpathy_samples, table_samples


def shards_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmcap shards",
        description="Write webdataset shards (KEY.jpg/png/webp + KEY.txt + KEY.json) from a captioned dataset.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco-captions", metavar="JSON", help="COCO captions_*.json (images + annotations)")
    src.add_argument("--karpathy", metavar="JSON", help="Karpathy split file (dataset_coco.json): writes train/val/test")
    src.add_argument("--table", metavar="FILE", help=".csv, .tsv or .jsonl with an image and a caption column")
    src.add_argument("--folder", metavar="DIR", help="images with sidecar .txt captions, one per line")
    p.add_argument("--images", metavar="DIR",
                   help="image root (COCO/Karpathy: required; table: base for relative paths)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory, shards named {split}-%%06d.tar")
    p.add_argument("--split", default=None,
                   help="split name for single-split sources (default: train, or from the COCO file name)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--maxsize", type=int, default=None, metavar="BYTES", help="largest shard size")
    p.add_argument("--resize-max", type=int, default=None, metavar="SIDE",
                   help="shrink images whose longest side exceeds SIDE (re-encoded as JPEG q=95)")
    p.add_argument("--workers", type=int, default=1, help="processes checking and encoding images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def shards_main(argv: list[str]) -> int:
    args = shards_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        splits = _source_splits(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"mmcap shards: {e}", file=sys.stderr)
        return 2
    total = WriteSummary()
    for split, samples in splits.items():
        if not samples:
            continue
        pattern = str(Path(args.out) / f"{split}-%06d.tar")
        summary = write_shards(samples, pattern, args.maxcount, args.maxsize, args.resize_max,
                               workers=args.workers, progress=not args.quiet)
        print(f"{split}: {summary}")
        total.samples += summary.samples
        total.shards += summary.shards
        total.skipped.update(summary.skipped)
    print(f"total: {total}")
    return 0 if total.samples else 1


def features_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmcap features",
        description="Run a frozen encoder over shards once and store its grid features as shards "
                    "(KEY.feat.npy + KEY.json), to train the projection and decoder without images: "
                    "mmcap fit ... --data.features_dir OUT",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="take the encoder of this save_pretrained directory")
    src.add_argument("--config", metavar="YAML",
                     help="a model or recipe YAML: its encoder (e.g. ImageNet weights) and image size")
    p.add_argument("--data", required=True, nargs="+", metavar="SHARDS",
                   help="image shards: brace patterns, globs, or several paths")
    p.add_argument("--out", required=True, metavar="DIR", help="features directory; shards named {split}-%%06d.tar")
    p.add_argument("--split", default="train", help="split name of these shards (default train)")
    p.add_argument("--image-size", "--image_size", type=int, default=None,
                   help="resolution (default: the model's or config's image_size)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage type of the grids (float16/bfloat16 halve the size)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="encoder compute precision (bf16: as bf16-mixed training computes it, much faster on "
                        "GPUs and bf16 CPUs; default fp32)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=64)
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from mmcap.training.features import encoder_for_features, extract_features

    start = time.perf_counter()
    try:
        encoder, image_size = encoder_for_features(model_dir=args.model, config=args.config,
                                                   image_size=args.image_size)
        summary = extract_features(encoder, args.data, args.out, split=args.split,
                                   image_size=args.image_size or image_size, batch_size=args.batch_size,
                                   dtype=args.dtype, maxcount=args.maxcount, device=args.device,
                                   precision=args.precision, progress=not args.quiet)
    except (OSError, ValueError) as e:
        print(f"mmcap features: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.split}: {summary} in {time.perf_counter() - start:.1f} s")
    return 0 if summary.samples else 1


def _source_splits(args: argparse.Namespace) -> dict:
    if args.karpathy:
        _require_images(args, "--karpathy")
        return karpathy_samples(args.karpathy, args.images)
    if args.coco_captions:
        _require_images(args, "--coco-captions")
        name = Path(args.coco_captions).stem  # captions_val2017 -> val
        guess = next((s for s in ("train", "val", "test") if s in name), "train")
        return {args.split or guess: coco_samples(args.coco_captions, args.images)}
    if args.table:
        return {args.split or "train": table_samples(args.table, args.image_column, args.caption_column, args.images)}
    return {args.split or "train": folder_samples(args.folder)}


def _require_images(args: argparse.Namespace, flag: str) -> None:
    if not args.images:
        raise ValueError(f"{flag} needs --images DIR")
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images {args.images} is not a directory")


def data_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcap data", description="Make datasets.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate a synthetic demo dataset (scenes and their captions)")
    demo.add_argument("--out", default="data/demo", metavar="DIR")
    demo.add_argument("--kind", choices=["shapes", "glyphs"], default="shapes",
                      help="shapes: 128 px coloured shapes (the main job's data); glyphs: 64 px stroke-drawn "
                           "marks on textured backgrounds, another vocabulary (for checking defaults)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n-train", type=int, default=None, help="default 6000 (shapes) or 8000 (glyphs)")
    demo.add_argument("--n-val", type=int, default=300)
    demo.add_argument("--n-test", type=int, default=300)
    demo.add_argument("--image-size", type=int, default=None, help="default 128 (shapes) or 64 (glyphs)")
    demo.add_argument("--force", action="store_true", help="regenerate even if the directory is complete")
    args = p.parse_args(argv)

    from mmcap.data.demo import make_demo

    started = time.perf_counter()
    done = make_demo(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                     image_size=args.image_size, force=args.force, kind=args.kind)
    splits = ", ".join(f"{k} {v['samples']} samples / {v['shards']} shards" for k, v in done["splits"].items())
    print(f"demo data in {args.out}: {splits} ({time.perf_counter() - started:.1f} s)")
    return 0
