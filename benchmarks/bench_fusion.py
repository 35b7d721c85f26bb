"""Decoders and fusions compared on the demo data at the same step budget. Prints one JSON line
(and a table on stderr).

    python benchmarks/bench_fusion.py [--steps 150] [--warmup 10] [--runs gpt2_cross_attention,llama_prefix]

The runs (`RUNS`), each `mmcap fit` of a demo recipe with a few overrides:

    gpt2_cross_attention          configs/demo.yaml: GPT-2 with its own cross-attention layers
    llama_cross_attention         configs/demo_llama.yaml, decoder.fusion cross_attention (gated blocks)
    llama_prefix                  configs/demo_llama.yaml: the image tokens before the text, train full
    llama_prefix_lora             the same, decoder.train lora (LoRA on the random-init LM)
    llama_prefix_lora_pretrained  decoder.train lora on `decoder.pretrained` = the LM that llama_prefix
                                  trained, saved as a local checkpoint directory (runs after it)
    llama_prefix_frozen_pretrained  decoder.train frozen on that same LM: only the encoder and the
                                  projection learn; the LM reads the image tokens as it is

Every run trains `--steps` steps (LR warm-up 10 % of them, the recipes' 40 of 400; no validation)
in its own subprocess, so that its peak memory is its own. Reported per run:

- `CIDEr` (and BLEU-4): greedy decoding of the demo test images with `Captioner.caption`
  (batch 32, max 20 new tokens, `--precision`, fp32 by default), scored with all references;
- `captions_per_s`: that same `caption` call, timed after a one-batch warm-up (it depends on
  how long the captions are: `mean_caption_words`);
- `trainable_params`, `total_params` of the captioner (encoder included; LoRA adapters count);
- `samples_per_s` (and per CPU second): training steps after `--warmup`, data loading included;
- `peak_rss_growth_mb`: the process's peak resident memory during `fit` above what it held when
  `fit` began (model, gradients, optimizer state, activations; the data worker process apart);
- `checkpoint_mb`: the Lightning checkpoint `mmcap fit` writes at the end (`last.ckpt`: weights,
  optimizer state, mmcap's model entry), and `frozen_params_in_checkpoint`: how many of
  its weights are frozen parameters. A LoRA/frozen checkpoint leaves the LM's frozen weights out
  only when they reload from `decoder.pretrained`; an LM built from config (llama_prefix_lora) has
  nowhere to reload them from, so its checkpoint keeps them and saves only their optimizer state.

On a busy machine trust the per-CPU-second rates more than the wall ones. Extra arguments after
`--` are `mmcap fit` overrides for every run, e.g. `-- --trainer.precision 32-true`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

RUNS = {
    "gpt2_cross_attention": ("configs/demo.yaml", []),
    "llama_cross_attention": ("configs/demo_llama.yaml", ["--model.captioner.decoder.fusion", "cross_attention"]),
    "llama_prefix": ("configs/demo_llama.yaml", []),
    "llama_prefix_lora": ("configs/demo_llama.yaml", ["--model.captioner.decoder.train", "lora"]),
    "llama_prefix_lora_pretrained": ("configs/demo_llama.yaml", ["--model.captioner.decoder.train", "lora",
                                                                 "--model.captioner.decoder.pretrained", "{lm_dir}"]),
    "llama_prefix_frozen_pretrained": ("configs/demo_llama.yaml", ["--model.captioner.decoder.train", "frozen",
                                                                   "--model.captioner.decoder.pretrained", "{lm_dir}"]),
}
PRETRAINED_FROM = "llama_prefix"  # whose trained LM the *_pretrained runs start from
COLUMNS = [("CIDEr", "CIDEr"), ("trainable_params", "trainable"), ("total_params", "total"),
           ("samples_per_s", "samples/s"), ("samples_per_cpu_s", "samples/cpu-s"), ("captions_per_s", "captions/s"),
           ("peak_rss_growth_mb", "peak MB"), ("checkpoint_mb", "ckpt MB")]


def parameter_counts(module) -> tuple[int, int]:
    """(trainable, total) parameters of `module`; a tied weight counts once."""
    params = list(module.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def frozen_in_checkpoint(captioner, state_dict: dict) -> int:
    """How many of a CaptionModule checkpoint's weights (`captioner.*`) are frozen parameters."""
    frozen = {f"captioner.{name}" for name, p in captioner.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    return sum(t.numel() for name, t in state_dict.items() if name in frozen)


def run_one(name: str, args, lm_dir: Path) -> dict:
    """Train, checkpoint and evaluate one run in this process."""
    import torch
    from fits import StepTimer, build_fit, quiet_fit_overrides
    from measure import peak_rss_mb, reset_peak_rss

    from mmcap.data.streams import iter_samples
    from mmcap.metrics import caption_metrics

    config, overrides = RUNS[name]
    root = Path(args.root) / name
    shutil.rmtree(root / "checkpoints", ignore_errors=True)  # a checkpoint of an earlier run is not this one's
    model, data, trainer = build_fit(config, [
        *quiet_fit_overrides(root), "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", "1000000",
        "--model.optim.warmup_steps", str(max(1, args.steps // 10)),
        *[o.format(lm_dir=lm_dir) for o in overrides], *args.extra])
    timer = StepTimer(args.warmup)
    trainer.callbacks.append(timer)
    reset_peak_rss()
    at_start = peak_rss_mb()  # right after a reset the peak is the current size
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - started
    peak_growth = peak_rss_mb() - at_start
    wall_rate, cpu_rate = timer.rates()

    captioner = model.captioner
    checkpoint = root / "checkpoints" / "last.ckpt"  # what mmcap fit's ModelCheckpoint wrote at the end
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    if name == PRETRAINED_FROM:  # the LM as a checkpoint directory, as a hub download would be
        captioner.decoder.save_pretrained(lm_dir)
        captioner.tokenizer.save(lm_dir)

    captioner.eval()
    examples = list(iter_samples(data.test_shards))
    images = [ex.image for ex in examples]
    options = dict(batch_size=32, num_beams=1, max_new_tokens=20, precision=args.precision)
    captioner.caption(images[:32], **options)  # warm-up
    started = time.perf_counter()
    captions = captioner.caption(images, **options)
    caption_seconds = time.perf_counter() - started
    metrics = caption_metrics({ex.key: ex.captions for ex in examples},
                              {ex.key: c for ex, c in zip(examples, captions)}, meteor=False)
    trainable, total = parameter_counts(captioner)
    loss = trainer.callback_metrics.get("train/loss")
    return {
        "config": config, "overrides": [o.format(lm_dir=lm_dir) for o in overrides],
        "precision": str(trainer.precision), "CIDEr": round(metrics["CIDEr"], 4), "BLEU-4": round(metrics["BLEU-4"], 4),
        "final_train_loss": None if loss is None else round(float(loss), 4),
        "trainable_params": trainable, "total_params": total,
        "samples_per_s": round(wall_rate, 2), "samples_per_cpu_s": round(cpu_rate, 2),
        "train_seconds": round(train_seconds, 1), "test_images": len(examples),
        "captions_per_s": round(len(examples) / caption_seconds, 2),
        "mean_caption_words": round(sum(len(c.split()) for c in captions) / len(captions), 2),
        "peak_rss_growth_mb": round(peak_growth, 1),
        "checkpoint_mb": round(checkpoint.stat().st_size / 2**20, 2),
        "checkpoint_weights": sum(t.numel() for t in weights.values()),
        "frozen_params_in_checkpoint": frozen_in_checkpoint(captioner, weights),
    }


def table(runs: dict) -> str:
    def cell(key, value):
        if value is None:
            return "-"
        if key.endswith("params"):
            return f"{value / 1e6:.2f}M"
        return f"{value:g}"

    rows = [["run", *(title for _, title in COLUMNS)]]
    rows += [[name, *(cell(key, r.get(key)) for key, _ in COLUMNS)] for name, r in runs.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps of every run")
    p.add_argument("--warmup", type=int, default=10, help="steps before the training rate is timed")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--precision", default="fp32", help="of Captioner.caption for CIDEr and captions/s")
    p.add_argument("--root", default="runs/bench_fusion")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one run, in a subprocess of the main process
    p.add_argument("extra", nargs="*", help="more --section.key value overrides for every run")
    args = p.parse_args()
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")
    lm_dir = Path(args.root) / f"{PRETRAINED_FROM}_lm"
    if args.child:
        warnings.filterwarnings("ignore")
        print(json.dumps(run_one(args.child, args, lm_dir)), flush=True)
        return

    from measure import emit, log

    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        p.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    for name in names:
        if name.endswith("_pretrained") and PRETRAINED_FROM not in names and not lm_dir.is_dir():
            p.error(f"{name} starts from the LM that {PRETRAINED_FROM} trains: run that too")
    names.sort(key=list(RUNS).index)
    runs = {}
    for name in names:
        log(f"bench_fusion: {name} ({args.steps} steps) ...")
        command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--precision", args.precision, "--root", args.root, "--", *args.extra]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            log(done.stderr[-4000:])
            raise SystemExit(f"bench_fusion: run {name} failed (exit {done.returncode})")
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"  {json.dumps(runs[name])}")
    result = {"benchmark": "fusion", "steps": args.steps, "timed_steps": args.steps - args.warmup,
              "decoding": f"greedy, batch 32, max 20 new tokens, {args.precision}", "runs": runs}
    for lora in ("llama_prefix_lora", "llama_prefix_lora_pretrained", "llama_prefix_frozen_pretrained"):
        if lora in runs and "llama_prefix" in runs:
            result[f"{lora}_checkpoint_vs_full"] = round(runs[lora]["checkpoint_mb"] / runs["llama_prefix"]["checkpoint_mb"], 3)
    log(table(runs))
    emit(result)


if __name__ == "__main__":
    main()
