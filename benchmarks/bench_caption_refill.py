"""Slot refill against batch-at-a-time decoding, over a collection of files, in one run.

    python benchmarks/bench_caption_refill.py --model runs/demo/model --data 'data/demo/test-*.tar'
    python benchmarks/bench_caption_refill.py --model M --data D --n 3000 --precisions fp32 int8
    python benchmarks/bench_caption_refill.py --precisions int8 --num-beams 8   # more decoding per image

`Captioner.caption_stream` (what `mmcap caption` runs) over `--n` JPEG files written from the test
shards' images (cycling through them), with the model's own generation settings (beam search),
batch 16 and 2 decoding workers: once with `refill=False` (batch at a time, the streaming of
earlier versions) and once with slot refill (the default), alternating, `--rounds` times each;
the best pass of each counts. A trained model is the point: its captions end at different steps,
which is what leaves batch-at-a-time rows idle (a random model's captions all run to the limit).

Per precision it prints captions/s of both, their ratio, the decoding steps each ran (refill: fewer
steps, each with every row busy; batch at a time: a batch's rows empty as its images finish), and
the share of captions identical between the two and equal to `Captioner.caption`'s for the first
`--check` files. fp32: all of them, up to float ties. int8 on mmcap's AMX kernel quantizes
activations per row, so the rows a step holds do not change an image's numbers either (torch's
engines quantize per tensor: there the share may fall below 1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from measure import emit, log

from mmcap import Captioner


def write_files(data: str, n: int, out: Path) -> list[str]:
    """`n` JPEG files cycling through the image bytes of the shards `data`."""
    import webdataset as wds

    from mmcap.data.shardlist import resolve_shards

    images = [s["jpg"] for s in wds.WebDataset(resolve_shards(data), shardshuffle=False) if "jpg" in s]
    if not images:
        raise SystemExit(f"no .jpg samples in {data}")
    paths = []
    for i in range(n):
        p = out / f"{i:06d}.jpg"
        p.write_bytes(images[i % len(images)])
        paths.append(str(p))
    return paths


STEPS = {"steps": 0}  # decoding steps of the pass running (GPT-2's lean pass, either way)


def count_steps() -> None:
    """Count GPT-2's decoding steps: batch at a time (`_step`) and refilled (`step_rows`)."""
    from mmcap.generation.gpt2_pass import GPT2Decoding

    for name in ("_step", "step_rows"):
        def counted(self, *a, _f=getattr(GPT2Decoding, name), **kw):
            STEPS["steps"] += 1
            return _f(self, *a, **kw)
        setattr(GPT2Decoding, name, counted)


def one_pass(model: Captioner, paths: list[str], refill: bool, args, precision: str) -> tuple[float, dict[str, str], bool]:
    STEPS["steps"] = 0
    start = time.perf_counter()
    stream = model.caption_stream(paths, batch_size=args.batch_size, num_workers=args.num_workers,
                                  precision=precision, refill=refill, **overrides(args))
    captions = {r["image"]: r.get("caption") for r in stream}
    return len(paths) / (time.perf_counter() - start), captions, stream.refilling


def overrides(args) -> dict:
    """Generation options given on the command line (the model's own otherwise)."""
    return {} if args.num_beams is None else {"num_beams": args.num_beams}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/model")
    p.add_argument("--data", default="data/demo/test-*.tar", help="shards whose images make the files")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    p.add_argument("--check", type=int, default=300, help="files whose refilled captions are compared with caption()'s")
    p.add_argument("--num-beams", type=int, default=None,
                   help="beams (default: the model's own): more beams, more decoding per image")
    args = p.parse_args(argv)

    out_dir = Path(tempfile.mkdtemp(prefix="mmcap-refill-"))
    count_steps()
    model = Captioner.from_pretrained(args.model)
    paths = write_files(args.data, args.n, out_dir)
    result = {"model": args.model, "n": args.n, "batch_size": args.batch_size, "num_workers": args.num_workers,
              "generation": {k: v for k, v in model.generation_options(**overrides(args)).to_dict().items()
                             if k in ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "early_stopping")}}
    for precision in args.precisions:
        one_pass(model, paths[:64], True, args, precision)  # warm-up: kernels, timed choices
        one_pass(model, paths[:64], False, args, precision)
        best = {"batch": 0.0, "refill": 0.0}
        out, steps = {}, {}
        for r in range(args.rounds):
            for name, refill in (("batch", False), ("refill", True)):
                rate, captions, refilling = one_pass(model, paths, refill, args, precision)
                assert refilling == refill, "refill did not apply to this model here"
                best[name], out[name], steps[name] = max(best[name], rate), captions, STEPS["steps"]
                log(f"{precision} round {r}: {name} {rate:.2f} captions/s")
        same = sum(out["batch"][k] == out["refill"][k] for k in paths) / len(paths)
        head = paths[: args.check]
        api = model.caption(head, batch_size=args.batch_size, precision=precision, **overrides(args))
        same_api = sum(a == out["refill"][k] for a, k in zip(api, head)) / len(head)
        words = [len((c or "").split()) for c in out["batch"].values()]
        result[precision] = {"caption_words_mean": round(statistics.mean(words), 2), "caption_words_max": max(words),
                             "caption_words_min": min(words), "batch_captions_per_s": round(best["batch"], 2),
                             "refill_captions_per_s": round(best["refill"], 2),
                             "refill_over_batch": round(best["refill"] / best["batch"], 3),
                             "decoder_steps_batch": steps["batch"], "decoder_steps_refill": steps["refill"],
                             "same_as_batch": round(same, 4), f"same_as_caption_api_first_{len(head)}": round(same_api, 4)}
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
