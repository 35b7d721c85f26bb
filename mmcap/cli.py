"""`mmcap` command: dispatches to the subcommands, each living beside the code it drives."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = """usage: mmcap COMMAND [options]

commands:
  caption    caption images with a saved model
  fit, validate, test, predict
             Lightning training/evaluation driven by YAML configs (LightningCLI)
  eval       caption metrics of a saved model on shards
  export     write a save_pretrained directory from a Lightning checkpoint
  shards     write webdataset shards from COCO, CSV/JSONL or a folder
  features   precompute a frozen encoder's grid features into shards (train the decoder fast)
  data       make datasets (`mmcap data demo --out data/demo`)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "caption":
        return caption_main(rest)
    if cmd in ("fit", "validate", "test", "predict"):
        from .training.cli import lightning_main

        return lightning_main([cmd, *rest])
    if cmd in ("eval", "export"):
        from .training import cli as training_cli

        return getattr(training_cli, f"{cmd}_main")(rest)
    if cmd == "shards":
        from .data.cli import shards_main

        return shards_main(rest)
    if cmd == "features":
        from .data.cli import features_main

        return features_main(rest)
    if cmd == "data":
        from .data.cli import data_main

        return data_main(rest)
    print(f"mmcap: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Generation options, named as in transformers."""
    g = p.add_argument_group("generation")
    g.add_argument("--num-beams", "--num_beams", type=int, default=3)
    g.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=None)
    g.add_argument("--min-new-tokens", "--min_new_tokens", type=int, default=0)
    g.add_argument("--length-penalty", "--length_penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", "--no_repeat_ngram_size", type=int, default=0)
    g.add_argument("--do-sample", "--do_sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", "--top_k", type=int, default=50)
    g.add_argument("--top-p", "--top_p", type=float, default=1.0)


def generation_kwargs(args: argparse.Namespace) -> dict:
    kw = {k: getattr(args, k) for k in ("num_beams", "min_new_tokens", "length_penalty", "no_repeat_ngram_size",
                                         "do_sample", "temperature", "top_k", "top_p")}
    if args.max_new_tokens is not None:
        kw["max_new_tokens"] = args.max_new_tokens
    return kw


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
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="bf16: about twice as fast on GPUs and CPUs with bf16 instructions, slightly different "
                        "captions; auto: bf16 where it is fast (default: fp32, the reference results)")
    add_generation_args(p)
    p.add_argument("images", nargs="+", help="image files or directories")
    args = p.parse_args(argv)

    import torch

    from .captioner import Captioner, compute_dtype
    from .images import ImageError, eval_transform, open_image

    model = Captioner.from_pretrained(args.model).to(args.device)
    dtype = compute_dtype(args.precision, args.device)
    if dtype != torch.float32:
        # inference only: store the weights in the compute dtype (half the memory, no per-batch casts)
        model.to(dtype).encoder.to(memory_format=torch.channels_last)
    size = model.config.image_size
    transform = eval_transform(size)
    paths = _image_paths(args.images)
    failures = 0
    good: list[tuple[Path, object]] = []
    for path in paths:
        try:
            good.append((path, transform(open_image(path, min_size=size if dtype != torch.float32 else None))))
        except ImageError as e:
            failures += 1
            print(f"mmcap caption: error: {e}", file=sys.stderr)
    kw = generation_kwargs(args)
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


if __name__ == "__main__":
    sys.exit(main())
