"""The inference commands: `mmcap caption` (images in, captions out) and `mmcap eval` (caption
metrics of a saved model on shards). Neither imports Lightning or any training code.

Generation options come from `GenerationConfig`'s fields (`add_generation_arguments`); the ones
a user leaves unset come from the model's own generation_config.json. `--precision` means what
`Captioner.caption(precision=...)` means: the same code runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .generation_config import add_generation_arguments, generation_overrides
from .precision import PRECISIONS

PRECISION_HELP = ("fp32: the reference results (default); bf16: bfloat16 compute, about twice as fast where "
                  "the hardware has fast bf16, slightly different captions; auto: bf16 where it measured "
                  "faster than fp32 on this machine, else fp32")


def _image_paths(inputs: list[str]) -> list[Path]:
    from .images import IMAGE_EXTENSIONS

    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(p)
    return paths


def caption_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcap caption", description="Caption images with a saved mmcap model.")
    p.add_argument("--model", required=True, help="a save_pretrained directory")
    p.add_argument("--format", choices=["text", "jsonl"], default="text")
    p.add_argument("--batch-size", "--batch_size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    add_generation_arguments(p)
    p.add_argument("images", nargs="+", help="image files or directories")
    args = p.parse_args(argv)

    import torch

    from .captioner import Captioner
    from .images import ImageError, eval_transform, open_image
    from .precision import compute_dtype

    model = Captioner.from_pretrained(args.model).to(args.device)
    draft = compute_dtype(args.precision, args.device) != torch.float32
    size = model.config.image_size
    transform = eval_transform(size)
    paths = _image_paths(args.images)
    failures = 0
    good: list[tuple[Path, object]] = []
    for path in paths:
        try:
            good.append((path, transform(open_image(path, min_size=size if draft else None))))
        except ImageError as e:
            failures += 1
            print(f"mmcap caption: error: {e}", file=sys.stderr)
    kw = generation_overrides(args)
    for start in range(0, len(good), args.batch_size):
        chunk = good[start : start + args.batch_size]
        pixels = torch.stack([t for _, t in chunk])
        captions, scores = model.caption(pixels, batch_size=args.batch_size, return_scores=True,
                                         precision=args.precision, **kw)
        for (path, _), text, score in zip(chunk, captions, scores.tolist()):
            if args.format == "jsonl":
                print(json.dumps({"image": str(path), "caption": text, "log_prob": score}), flush=True)
            else:
                print(f"{path}\t{text}", flush=True)
    if not paths:
        print("mmcap caption: error: no images given", file=sys.stderr)
        return 1
    return 1 if failures else 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcap eval", description="Caption metrics of a saved model on webdataset shards.")
    p.add_argument("--model", required=True, help="a save_pretrained directory")
    p.add_argument("--data", required=True, nargs="+",
                   help="shards: brace patterns (test-{000000..000003}.tar), globs, or several paths")
    p.add_argument("--json", action="store_true", help="print one JSON line with the metrics only")
    p.add_argument("--batch-size", "--batch_size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-meteor", "--no_meteor", action="store_true", help="skip METEOR (needs Java, slow to start)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    add_generation_arguments(p)
    args = p.parse_args(argv)

    import torch

    from .captioner import Captioner
    from .data.streams import iter_samples
    from .images import eval_transform
    from .metrics import evaluate_captions

    try:
        model = Captioner.from_pretrained(args.model).to(args.device)
    except (OSError, ValueError) as e:
        print(f"mmcap eval: error: {e}", file=sys.stderr)
        return 1
    transform = eval_transform(model.config.image_size)
    skipped: Counter = Counter()
    references, predictions = {}, {}
    batch: list = []

    def flush() -> None:
        if any(ex.image is None for ex in batch):
            raise ValueError(f"{batch[0].key}: mmcap eval reads image shards; these hold precomputed features "
                             "(evaluate the model on the image shards they were made from)")
        pixels = torch.stack([transform(ex.image) for ex in batch]).to(args.device)
        captions = model.caption(pixels, batch_size=len(batch), precision=args.precision,
                                 **generation_overrides(args))
        for ex, caption in zip(batch, captions):
            if ex.key not in predictions:
                predictions[ex.key], references[ex.key] = caption, ex.captions
        batch.clear()

    try:
        for example in iter_samples(args.data, skipped=skipped, min_image_size=model.config.image_size):
            batch.append(example)
            if len(batch) == args.batch_size:
                flush()
        if batch:
            flush()
    except (FileNotFoundError, ValueError) as e:
        print(f"mmcap eval: error: {e}", file=sys.stderr)
        return 1
    if skipped:
        print("mmcap eval: skipped " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())), file=sys.stderr)
    if not predictions:
        print("mmcap eval: error: no usable samples in --data", file=sys.stderr)
        return 1
    metrics = evaluate_captions(references, predictions, meteor=not args.no_meteor)
    if args.json:
        metrics.pop("exact_match")
        print(json.dumps(metrics))
    else:
        print(f"{len(predictions)} images")
        for name, value in metrics.items():
            print(f"{name:8s} {'n/a (no Java)' if value is None else f'{value:.4f}'}")
    return 0
