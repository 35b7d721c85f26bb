"""The inference commands: `mmcap caption` (images in, captions out) and `mmcap eval` (caption
metrics of a saved model on shards). Neither imports Lightning or any training code.

`mmcap caption` streams (`mmcap.captioner.stream`) and writes stdout or an `--output`
(`mmcap.inference.writers`: JSON Lines, COCO results, shards; `--resume`).

Generation options come from `GenerationConfig`'s fields (`add_generation_arguments`); the ones
a user leaves unset come from the model's own generation_config.json. `--precision` means what
`Captioner.caption(precision=...)` means: the same code runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from mmcap.generation.config import add_generation_arguments, generation_overrides
from mmcap.accel.plan import PRECISIONS, as_plan

PRECISION_HELP = ("fp32: the reference results (default); bf16: bfloat16 compute, about twice as fast where "
                  "the hardware has fast bf16, slightly different captions; auto: bf16 where it measured "
                  "faster than fp32 on this machine, else fp32; int8: as auto, with the decoder's linear layers and LM "
                  "head in int8 (CPUs; lossy, never chosen by auto)")


def caption_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmcap caption",
        description="Caption image files, folders and webdataset shards with a saved mmcap model, streaming: "
                    "images are decoded in worker processes while the model works, and memory stays flat.")
    p.add_argument("--model", required=True, help="a save_pretrained directory or a Hugging Face Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    p.add_argument("--output", default=None,
                   help="write results here (JSON Lines unless --format says otherwise; a directory for shards) "
                        "instead of stdout")
    p.add_argument("--format", choices=["text", "jsonl", "coco", "shards", "parquet"], default=None,
                   help="stdout: text (default) or jsonl; --output: jsonl (default), coco (results JSON) or "
                        "shards (new shards: every input member plus KEY.mmcap.json); --engine ray: parquet "
                        "(default) or jsonl files in the --output directory")
    p.add_argument("--resume", action="store_true",
                   help="complete the --output of an earlier run, skipping the images it holds")
    p.add_argument("--batch-size", "--batch_size", type=int, default=16)
    p.add_argument("--num-workers", "--num_workers", type=int, default=2,
                   help="processes decoding images while the model works (0: in the main process)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--prompt", default=None,
                   help="text every caption continues (e.g. 'a photo of'); the captions written leave it out")
    p.add_argument("--compile-decoder", action="store_true",
                   help="compile GPT-2's decoding steps over a static cache (torch.compile; on GPUs they replay as "
                        "CUDA graphs, one launch per token): tens of seconds of compiling first; for GPUs (slower on "
                        "CPUs); not with --precision int8")
    p.add_argument("--no-refill", dest="refill", action="store_false",
                   help="decode batch by batch instead of refilling a finished image's beam rows with the next "
                        "image (refill: beam search, GPT-2 decoders, where mmcap's kernels run; same captions)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: stream on this machine (default); ray: Ray Data, on a cluster or a local Ray, "
                        "one output file per input in the --output directory (pip install \"mmcap[ray]\")")
    ray = p.add_argument_group("--engine ray")
    ray.add_argument("--ray-address", default=None,
                     help="a running cluster (auto: the one this machine belongs to); default: start a local Ray")
    ray.add_argument("--concurrency", type=int, default=1, help="model workers (Ray actors), each loading the model")
    ray.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs each model worker reserves")
    ray.add_argument("--threads-per-worker", type=int, default=None,
                     help="torch threads per model worker (default: its CPUs; a local Ray without GPUs: this "
                          "machine's cores over --concurrency)")
    ray.add_argument("--files-per-output", type=int, default=1000,
                     help="image files per output file (all files sorted, then cut; each shard and Parquet "
                          "file has its own)")
    ray.add_argument("--image-column", default=None, help="Parquet inputs: the column of image bytes (default: "
                     "the first of jpg, jpeg, png, webp, image, bytes, img)")
    ray.add_argument("--key-column", default=None,
                     help="Parquet inputs: the column naming each image (default: __key__, path, key or id, else the row number)")
    add_generation_arguments(p)
    p.add_argument("images", nargs="+",
                   help="image files, folders (read recursively) and shards (brace patterns, globs, URLs, pipe:); "
                        "with --engine ray also Parquet files")
    args = p.parse_args(argv)
    if args.engine == "ray" and args.compile_decoder:
        p.error("--compile-decoder is for --engine local")
    if args.engine == "ray":
        from mmcap.inference.ray_run import caption_on_ray

        return caption_on_ray(args)
    if args.format == "parquet":
        p.error("--format parquet is for --engine ray")
    fmt = args.format or ("jsonl" if args.output else "text")
    if args.output is None and fmt in ("coco", "shards"):
        p.error(f"--format {fmt} needs --output")
    if args.output is not None and fmt == "text":
        p.error("--format text is for stdout: use jsonl, coco or shards with --output")
    if args.resume and args.output is None:
        p.error("--resume completes an --output file")

    from mmcap.inference.writers import open_writer
    from mmcap.captioner.model import Captioner
    from mmcap.data.image_stream import plan_inputs

    try:
        inputs = plan_inputs(args.images)
        if not inputs.files and not inputs.shards:
            raise ValueError("no images given")
        if fmt == "shards" and inputs.files:
            raise ValueError(f"--format shards re-captions shards; {inputs.files[0]} is not one")
        model = Captioner.from_pretrained(args.model, revision=args.revision).to(args.device)
        precision = as_plan(args.precision, model.device, compile_decoder=args.compile_decoder)
        writer = open_writer(fmt, args.output, inputs.shards, args.resume) if args.output else None
    except (OSError, ValueError) as e:
        print(f"mmcap caption: error: {e}", file=sys.stderr)
        return 1
    done = writer.done if writer else ()
    stream = model.caption_stream(inputs, batch_size=args.batch_size, num_workers=args.num_workers,
                                  precision=precision, done=done, keep_members=fmt == "shards",
                                  prompt=args.prompt, refill=args.refill, **generation_overrides(args))
    tally = run_stream(stream, writer, fmt)
    return report(tally, stream.shard_errors, writer.earlier if writer else Counter())


def run_stream(stream, writer, fmt: str) -> Counter:
    """Write every result (stdout or `writer`) batch by batch, with a progress bar; the tally by outcome."""
    import time

    from tqdm import tqdm

    from mmcap.inference.writers import outcome

    tally: Counter = Counter()
    started = time.perf_counter()
    bar = tqdm(total=stream.total, unit="img", desc="mmcap caption", file=sys.stderr, dynamic_ncols=True,
               disable=None)  # on a terminal only: logs stay clean
    try:
        for batch in stream.batches():
            for record in batch.records:
                tally[outcome(record)] += 1
                if "error" in record:
                    detail = f" ({record['detail']})" if "detail" in record else ""
                    where = f"{record['shard']}:" if "shard" in record else ""
                    bar.write(f"mmcap caption: error: {where}{record['image']}: {record['error']}{detail}",
                              file=sys.stderr)
            if writer is not None:
                writer.write(batch.records)
                for url in batch.finished_shards:
                    writer.finish_shard(url)
            else:
                print_records(batch.records, fmt)
            bar.update(len(batch.records))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    tally["seconds"] = time.perf_counter() - started
    return tally


def print_records(records: list[dict], fmt: str) -> None:
    for r in records:
        if fmt == "jsonl":
            print(json.dumps({k: r[k] for k in ("image", "shard", "caption", "log_prob", "error") if k in r}))
        elif "caption" in r:
            print(f"{r['shard']}:{r['image']}\t{r['caption']}" if "shard" in r else f"{r['image']}\t{r['caption']}")
    sys.stdout.flush()


def report(tally: Counter, shard_errors: Counter, earlier: Counter) -> int:
    """The summary line on stderr; exit status 1 if any image (of this run or the earlier one) failed."""
    from mmcap.inference.writers import earlier_failures

    seconds = tally.pop("seconds")
    captioned = tally.pop("captioned", 0)
    failed = tally + shard_errors
    line = f"mmcap caption: {captioned} captioned, {sum(failed.values())} failed"
    if failed:
        line += " (" + ", ".join(f"{k}={v}" for k, v in sorted(failed.items())) + ")"
    line += f" in {seconds:.1f} s ({(captioned + sum(tally.values())) / max(seconds, 1e-9):.1f} images/s)"
    if earlier:
        line += "; already written: " + ", ".join(f"{k}={v}" for k, v in sorted(earlier.items()))
    print(line, file=sys.stderr)
    return 1 if failed or earlier_failures(earlier) else 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcap eval", description="Caption metrics of a saved model on webdataset shards "
                                "(a sample whose json member has a `prompt` is captioned from that prompt).")
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

    from mmcap.captioner.model import Captioner
    from mmcap.data.streams import iter_samples
    from mmcap.images import eval_transform
    from mmcap.metrics import evaluate_captions

    try:
        model = Captioner.from_pretrained(args.model).to(args.device)
    except (OSError, ValueError) as e:
        print(f"mmcap eval: error: {e}", file=sys.stderr)
        return 1
    transform = eval_transform(model.config.image_size)
    plan = as_plan(args.precision, model.device)  # once for the whole evaluation
    skipped: Counter = Counter()
    references, predictions = {}, {}
    batch: list = []

    def flush() -> None:
        if any(ex.image is None for ex in batch):
            raise ValueError(f"{batch[0].key}: mmcap eval reads image shards; these hold precomputed features "
                             "(evaluate the model on the image shards they were made from)")
        pixels = torch.stack([transform(ex.image) for ex in batch]).to(args.device)
        captions = model.caption(pixels, batch_size=len(batch), precision=plan,
                                 prompt=[ex.prompt for ex in batch], **generation_overrides(args))
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
