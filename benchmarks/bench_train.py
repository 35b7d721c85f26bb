"""Training throughput of `mmcap fit` on the demo config: Lightning vs a plain PyTorch loop, and
bf16-mixed vs fp32. Prints one JSON line.

    python benchmarks/bench_train.py [--config configs/demo.yaml] [--steps 30] [--warmup 5]

Both loops do the same work per step on the same model and batches: forward under the same
autocast, backward, gradient clipping, AdamW step, LR-schedule step, zero_grad. Only steps after
the warm-up are timed (data loading included); each measurement is repeated and the best kept,
so that other processes on a shared machine disturb the result less. Rates are reported per wall
second and per CPU second of the process; on a busy machine trust the CPU-second ones. The
recipe's `trainer.precision` is overridden (bf16-mixed and 32-true are both measured);
`auto_precision` says what `trainer.precision: auto` chooses on this machine. Extra arguments are
`mmcap fit` overrides, e.g. `-- --model.training.channels_last false`.
"""
from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from fits import StepTimer, build_fit, quiet_fit_overrides
from measure import clocks, emit

from mmcap.accel.precision import lightning_precision


def lightning_rate(config: str, overrides: list[str], steps: int, warmup: int, precision: str) -> tuple[float, float]:
    model, data, trainer = build_fit(config, [*overrides, "--trainer.precision", precision,
                                              "--trainer.max_steps", str(warmup + steps)])
    timer = StepTimer(warmup)
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=data)
    return timer.rates()


def plain_rate(config: str, overrides: list[str], steps: int, warmup: int, precision: str) -> tuple[float, float]:
    """The same step in a hand-written loop (no Lightning in the timed region)."""
    from mmcap.training.optim import build_optimizer

    model, data, trainer = build_fit(config, [*overrides, "--trainer.precision", precision])
    data.prepare_data()
    data.setup("fit")
    opts = model.training_config
    captioner = model.build_captioner(data).train()
    if opts.channels_last:
        captioner.encoder.to(memory_format=torch.channels_last)
    data.set_tokenizer(captioner.tokenizer)
    optimizer, scheduler = build_optimizer(captioner, model.optim, warmup + steps)
    clip = trainer.gradient_clip_val
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    start, samples = None, 0
    for step, batch in enumerate(data.train_dataloader()):
        if step == warmup:
            start = clocks()
        pixels = batch["pixels"]
        if opts.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = captioner(pixels, batch["input_ids"], batch["attention_mask"], label_smoothing=opts.label_smoothing)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(captioner.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if start is not None:
            samples += pixels.shape[0]
        if step + 1 == warmup + steps:
            break
    end = clocks()
    return samples / (end[0] - start[0]), samples / (end[1] - start[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--root", default="runs/bench_train")
    p.add_argument("extra", nargs="*", help="more --section.key value overrides for the config")
    args = p.parse_args()
    overrides = ["--trainer.val_check_interval", "1000000", *quiet_fit_overrides(args.root), *args.extra]
    warnings.filterwarnings("ignore")
    runs = {"lightning_bf16": [], "plain_bf16": [], "lightning_fp32": [], "plain_fp32": []}
    for _ in range(args.repeats):  # interleaved, so slow phases of a shared machine hit all alike
        for precision, tag in (("bf16-mixed", "bf16"), ("32-true", "fp32")):
            runs[f"lightning_{tag}"].append(lightning_rate(args.config, overrides, args.steps, args.warmup, precision))
            runs[f"plain_{tag}"].append(plain_rate(args.config, overrides, args.steps, args.warmup, precision))
    wall = {k: max(r[0] for r in v) for k, v in runs.items()}
    cpu = {k: max(r[1] for r in v) for k, v in runs.items()}
    result = {
        "config": args.config,
        "timed_steps": args.steps,
        "auto_precision": lightning_precision("auto"),
        **{f"{k}_samples_per_s": round(v, 2) for k, v in wall.items()},
        **{f"{k}_samples_per_cpu_s": round(v, 2) for k, v in cpu.items()},
        "lightning_overhead_bf16_pct": round(100 * (1 - wall["lightning_bf16"] / wall["plain_bf16"]), 2),
        "lightning_overhead_fp32_pct": round(100 * (1 - wall["lightning_fp32"] / wall["plain_fp32"]), 2),
        "lightning_cpu_overhead_bf16_pct": round(100 * (1 - cpu["lightning_bf16"] / cpu["plain_bf16"]), 2),
        "lightning_cpu_overhead_fp32_pct": round(100 * (1 - cpu["lightning_fp32"] / cpu["plain_fp32"]), 2),
        "bf16_speedup": round(wall["lightning_bf16"] / wall["lightning_fp32"], 3),
        "bf16_cpu_speedup": round(cpu["lightning_bf16"] / cpu["lightning_fp32"], 3),
        "wall_spread_pct": round(100 * max(statistics.pstdev(r[0] for r in v) / statistics.mean(r[0] for r in v)
                                           for v in runs.values()), 2),
    }
    emit(result)


if __name__ == "__main__":
    main()
