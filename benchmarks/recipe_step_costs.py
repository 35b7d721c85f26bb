"""Seconds per training step of mmcap's demo model and its variants, and of plain_loop's model, on
synthetic batches (no data loading, no Lightning): which part of the recipe makes a step dear.
Prints one JSON line per variant and a markdown table.

    python benchmarks/recipe_step_costs.py --mmcap-src /work/mmcap_base [--image-size 64] [--threads 2]

A step is what both training loops do: forward (under bf16 autocast for the bf16 variants),
backward, gradient clipping at 1.0 (mmcap only), AdamW step, zero_grad. The variants are built
with `Captioner.from_config` from configs/model/demo_gpt2.yaml with one thing changed each. The
variants are timed in turns (round robin, `--rounds`), each round `--steps` steps after 2 warm-up
steps, and the best round is kept: other processes on a shared machine disturb the minimum least.
The load average is printed with every row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (model overrides, precision, channels_last)
VARIANTS = {
    "recipe (bf16-mixed, layer4 dilated, 4 layers, channels_last)": ({}, "bf16", True),
    "fp32": ({}, "fp32", True),
    "fp32, no channels_last": ({}, "fp32", False),
    "last_stage layer3 (bf16)": ({"encoder": {"last_stage": "layer3"}}, "bf16", True),
    "last_stage layer3, fp32": ({"encoder": {"last_stage": "layer3"}}, "fp32", True),
    "layer3, fp32, 3 decoder layers": ({"encoder": {"last_stage": "layer3"}, "decoder": {"num_layers": 3}}, "fp32", True),
    "layer3, bf16, 3 decoder layers": ({"encoder": {"last_stage": "layer3"}, "decoder": {"num_layers": 3}}, "bf16", True),
    "plain_loop model (fp32)": (None, "fp32", False),
    "plain_loop model (bf16)": (None, "bf16", False),
}
WORDS = "a small red ball in the top left corner there is big blue box to the right of".split()


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mmcap-src", default=None)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokens", type=int, default=14, help="caption length incl. BOS/EOS")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated substrings of variant names")
    args = p.parse_args(argv)
    if args.mmcap_src:
        sys.path.insert(0, str(Path(args.mmcap_src).resolve()))
    sys.path.insert(0, str(HERE))
    import torch
    import yaml

    from mmcap import Captioner
    from plain_loop import PlainCaptioner

    if args.threads:
        torch.set_num_threads(args.threads)
    src = Path(args.mmcap_src).resolve() if args.mmcap_src else HERE.parent
    base_cfg = yaml.safe_load((src / "configs" / "model" / "demo_gpt2.yaml").read_text())
    base_cfg.update(image_size=args.image_size, max_caption_tokens=24)
    captions = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    torch.manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    variants = {k: v for k, v in VARIANTS.items()
                if not args.only or any(s.strip() in k for s in args.only.split(","))}
    built = {}
    for name, (over, precision, channels_last) in variants.items():
        torch.manual_seed(0)
        if over is None:
            model = PlainCaptioner(64, -(-args.image_size // 16), 32).train()
            ids = torch.randint(4, 60, (args.batch_size, args.tokens))
            ids[:, 0] = 1

            def loss_fn(model=model, ids=ids):
                return model(pixels, ids)
            clip = False
        else:
            model = Captioner.from_config(merge(base_cfg, over), captions=captions).train()
            if channels_last:
                model.encoder.to(memory_format=torch.channels_last)
            ids = torch.randint(5, len(model.tokenizer), (args.batch_size, args.tokens))
            ids[:, 0] = model.tokenizer.bos_id
            mask = torch.ones_like(ids)
            x = pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels

            def loss_fn(model=model, ids=ids, mask=mask, x=x):
                return model(x, ids, mask)
            clip = True
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        built[name] = (model, opt, loss_fn, precision, clip)

    def step(model, opt, loss_fn, precision, clip):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, b in built.items():  # warm-up (oneDNN primitive creation and the like)
        for _ in range(2):
            step(*b)
    best = {name: float("inf") for name in built}
    cpu = {name: float("inf") for name in built}
    loads = []
    for _ in range(args.rounds):
        for name, b in built.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(*b)
            wall, used = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
            if wall < best[name]:
                best[name], cpu[name] = wall, used
            loads.append(os.getloadavg()[0])
    ref = next(iter(best.values()))
    print(f"threads {torch.get_num_threads()}, image {args.image_size} px, batch {args.batch_size}, "
          f"load average during the runs {min(loads):.2f}-{max(loads):.2f}, now {os.getloadavg()}")
    print("| variant | s/step (best round) | CPU s/step | vs recipe | params |\n| --- | ---: | ---: | ---: | ---: |")
    for name, (model, *_rest) in built.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {best[name]:.3f} | {cpu[name]:.3f} | {best[name] / ref:.2f}x | {params / 1e6:.1f} M |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
