"""mmcap's default training recipe against a plain PyTorch loop, same data, same machine, same
wall-clock budget. Prints the processor, one JSON line per arm and a markdown table.

    python benchmarks/bench_recipe.py --kind objects --budget 300                       # installed mmcap
    python benchmarks/bench_recipe.py --kind objects --mmcap-src /work/mmcap_base       # another source tree
    python benchmarks/bench_recipe.py --kind glyphs --arms mmcap --label fp32 -- --trainer.precision 32-true
    python benchmarks/bench_recipe.py --table runs/bench_recipe/objects/*.json          # re-print saved rows

Arms (`--arms`, default both):

- `mmcap`: `python -m mmcap.cli fit --config <src>/configs/demo.yaml` in a subprocess, with only the data
  keys (`--data.demo_dir null --data.{train,val,test}_shards`), `--data.image_size`, `--trainer.max_time`
  and `--trainer.max_steps -1` changed, plus bookkeeping that does not change training: run and
  checkpoint directories, `--export_dir`, `--test_after_fit false` (the test below replaces it),
  `--trainer.profiler simple` and the `recipe_probe.BudgetProbe` callback (where the time went).
  Anything after `--` is appended to its command line (recipe overrides for experiments).
- `plain`: `benchmarks/plain_loop.py` (ResNet-18 to layer3, 3-layer GPT-2 with cross-attention, fp32,
  AdamW 5e-4 constant, batch 32, images decoded once into memory, no augmentation, no validation).

Both are scored the same way: the test split captioned with beam 3 (mmcap: the exported model's
`Captioner.caption`, fp32; plain: its own beam search), CIDEr-D from `mmcap.metrics` (equal to
pycocoevalcap's), overall, on test images with a held-out colour/object pair and on the others,
and as a share of the oracle (each test image's first reference against its other three).

`--kind objects` (alias `third`) is benchmarks/data_kinds.py's kind; `shapes` and `glyphs` are
mmcap's demo kinds, made by the chosen mmcap's `make_demo`. Images are used at the kind's native
size (objects and glyphs 64 px, shapes 128 px) unless `--image-size` says otherwise.

The machine is shared: every result records the load average (1, 5, 15 min) at its start and end
and the CPU seconds it used, and `--wait-idle` holds each arm until the 1-minute load is low.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def processor() -> str:
    name = platform.processor() or "unknown"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flag_line = next(line for line in text.splitlines() if line.startswith("flags"))
        flags = " ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flag_line.split())
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} logical CPUs" + (f" ({flags})" if flags else "")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_idle(limit: float, max_wait: float) -> float:
    """Wait until the 1-minute load average is below `limit` (at most `max_wait` seconds)."""
    started = time.time()
    while os.getloadavg()[0] > limit and time.time() - started < max_wait:
        time.sleep(10)
    return round(time.time() - started, 1)


def max_time(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def score(references: dict, predictions: dict, held: set) -> dict:
    from mmcap.metrics import caption_metrics, exact_match_rate

    out = {"CIDEr": caption_metrics(references, predictions, meteor=False)["CIDEr"],
           "exact_match": exact_match_rate(references, predictions)}
    for name, wanted in (("held_out", True), ("seen", False)):
        keys = [k for k in references if (k in held) == wanted]
        if keys:
            refs, preds = {k: references[k] for k in keys}, {k: predictions[k] for k in keys}
            out[f"{name}_CIDEr"] = caption_metrics(refs, preds, meteor=False)["CIDEr"]
            out[f"{name}_exact_match"] = exact_match_rate(refs, preds)
            out[f"{name}_images"] = len(keys)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def run_mmcap(args, data_dir: Path, image_size: int, run_dir: Path, extra: list[str]) -> dict:
    src = Path(args.mmcap_src).resolve() if args.mmcap_src else None
    config = Path(args.config) if args.config else (src or REPO) / "configs" / "demo.yaml"
    cmd = [sys.executable, "-m", "mmcap.cli", "fit", "--config", str(config.resolve()),
           "--data.demo_dir", "null",
           "--data.train_shards", str(data_dir / "train-*.tar"),
           "--data.val_shards", str(data_dir / "val-*.tar"),
           "--data.test_shards", str(data_dir / "test-*.tar"),
           "--data.image_size", str(image_size),
           *(["--trainer.max_steps", str(args.max_steps)] if args.max_steps else
             ["--trainer.max_time", max_time(args.budget), "--trainer.max_steps", "-1"]),
           "--trainer.default_root_dir", str(run_dir), "--checkpoint.dirpath", str(run_dir / "checkpoints"),
           "--export_dir", str(run_dir / "model"), "--test_after_fit", "false",
           "--trainer.profiler", "simple", "--trainer.callbacks+=recipe_probe.BudgetProbe",
           *(["--seed_everything", str(args.seed)] if args.seed is not None else []), *extra]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*( [str(src)] if src else []), str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MMCAP_BENCH_PROBE"] = str(run_dir / "probe.json")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    cpu0, t0 = children_cpu(), time.perf_counter()
    with open(run_dir / "fit.log", "w") as log:
        rc = subprocess.call(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    if rc != 0:
        tail = (run_dir / "fit.log").read_text()[-3000:]
        raise SystemExit(f"mmcap fit failed (exit {rc}); {run_dir / 'fit.log'} ends:\n{tail}")
    probe = json.loads((run_dir / "probe.json").read_text())
    log_text = (run_dir / "fit.log").read_text()
    precision = next((line.strip() for line in log_text.splitlines() if "trainer.precision auto" in line), None)
    # caption the test split with the exported model, beam 3, as `Captioner.caption` does
    from PIL import Image

    from mmcap import Captioner

    model = Captioner.from_pretrained(str(run_dir / "model"))
    test = args._test
    t1 = time.perf_counter()
    images = [Image.open(io.BytesIO(img)).convert("RGB") for _, img, _, _ in test]
    captions = model.caption(images, batch_size=50, num_beams=args.beams)
    caption_s = time.perf_counter() - t1
    predictions = {key: c for (key, _, _, _), c in zip(test, captions)}
    (run_dir / "predictions.json").write_text(json.dumps(predictions, indent=0))
    samples = probe.get("samples") or probe["steps"] * 32
    return {
        "arm": "mmcap", "steps": probe["steps"], "samples": samples, "window_s": probe["window_s"],
        "time": probe["time"], "val_runs": probe["val_runs"], "epochs": probe["epochs"],
        "precision": probe["precision"], "precision_auto": precision,
        "train_samples_per_s": round(samples / probe["window_s"], 2),
        "compute_samples_per_s": round(samples / max(probe["time"]["compute"], 1e-9), 2),
        "process_wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1), "train_cpu_s": probe["process_cpu_s"],
        "test_caption_s": round(caption_s, 2), "curve": probe["curve"], "profiler_top": probe["profiler_top"][:12],
        "loadavg_train_start": probe["loadavg_start"], "loadavg_train_end": probe["loadavg_end"],
        "command": " ".join(cmd[1:]), "predictions": predictions,
    }


def run_plain(args, data_dir: Path, image_size: int, run_dir: Path) -> dict:
    cmd = [sys.executable, str(HERE / "plain_loop.py"), "--train", str(data_dir / "train-*.tar"),
           "--test", str(data_dir / "test-*.tar"), "--image-size", str(image_size),
           "--budget", str(1e9 if args.max_steps else args.budget), "--max-steps", str(args.max_steps or 0),
           "--beams", str(args.beams), "--out", str(run_dir), "--seed", str(args.seed or 0)]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cpu0, t0 = children_cpu(), time.perf_counter()
    with open(run_dir / "plain.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    if rc != 0:
        raise SystemExit(f"plain loop failed (exit {rc}): {(run_dir / 'plain.log').read_text()[-3000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    result["predictions"] = json.loads((run_dir / "predictions.json").read_text())
    result.update(process_wall_s=round(wall, 1), process_cpu_s=round(cpu, 1),
                  command=" ".join(["python", *[c if c != sys.executable else "python" for c in cmd[1:]]]))
    return result


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "-"


TABLE_HEAD = ("| data (oracle) | arm | steps | train samples/s | compute | data wait | validation | checkpoint | rest "
              "| test CIDEr-D, beam 3 | share of oracle | held-out / seen CIDEr-D | load avg start → end |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")


def table_row(r: dict) -> str:
    t, w = r["time"], r["window_s"]
    label = r["arm"] + (f" ({r['label']})" if r.get("label") else "")
    load = f"{r['loadavg_start'][0]:.2f} → {r['loadavg_end'][0]:.2f}"
    return (f"| {r['kind']} ({r['oracle_CIDEr']:.2f}) | {label} | {r['steps']:,} | {r['train_samples_per_s']:.0f} "
            f"| {pct(t['compute'], w)} | {pct(t['data'], w)} | {pct(t['validation'], w)} | {pct(t['checkpoint'], w)} "
            f"| {pct(t['rest'], w)} | {r['score']['CIDEr']:.2f} | {100 * r['score']['CIDEr'] / r['oracle_CIDEr']:.0f} % "
            f"| {r['score'].get('held_out_CIDEr', float('nan')):.2f} / {r['score'].get('seen_CIDEr', float('nan')):.2f} "
            f"| {load} |")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="objects", help="objects (alias third) | shapes | glyphs")
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per arm (default 300)")
    p.add_argument("--arms", default="mmcap,plain")
    p.add_argument("--mmcap-src", default=None, help="mmcap source tree to run and import (default: installed)")
    p.add_argument("--config", default=None, help="the recipe (default: <mmcap-src or repo>/configs/demo.yaml)")
    p.add_argument("--data-root", default="runs/bench_recipe/data", help="data kinds are written to DATA_ROOT/KIND")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=0,
                   help="train each arm for this many optimizer steps instead of a time budget (per-step learning; "
                        "mmcap's schedule then spans these steps)")
    p.add_argument("--seed", type=int, default=None, help="seed of both arms (default: the recipe's, 0)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both arms (default: torch's)")
    p.add_argument("--out", default="runs/bench_recipe")
    p.add_argument("--label", default="", help="names this run's mmcap arm (e.g. the override tried)")
    p.add_argument("--wait-idle", type=float, default=None, metavar="LOAD",
                   help="before each arm, wait (up to --wait-max s) until the 1-minute load average is below LOAD")
    p.add_argument("--wait-max", type=float, default=1200.0)
    p.add_argument("--table", nargs="*", default=None, help="print the table of saved result files and exit")
    args = p.parse_args(argv)
    if args.table is not None:
        print(TABLE_HEAD)
        for path in args.table:
            print(table_row(json.loads(Path(path).read_text())))
        return
    if args.mmcap_src:
        sys.path.insert(0, str(Path(args.mmcap_src).resolve()))
    sys.path.insert(0, str(HERE))
    import mmcap
    import torch

    from data_kinds import NATIVE_IMAGE_SIZE, canonical, make_kind, oracle_cider, read_split

    kind = canonical(args.kind)
    data_dir = Path(args.data_root).resolve() / kind
    image_size = args.image_size or NATIVE_IMAGE_SIZE[kind]
    made = make_kind(kind, data_dir)
    test = read_split(str(data_dir / "test-*.tar"))
    args._test = test
    references = {k: caps for k, _, caps, _ in test}
    held = {k for k, _, _, meta in test if meta.get("held_out")}
    oracle = oracle_cider(references)
    header = {"processor": processor(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "mmcap": str(Path(mmcap.__file__).parent), "kind": kind, "data": str(data_dir),
              "train_images": made.get("splits", {}).get("train", {}).get("samples"), "test_images": len(test),
              "held_out_test_images": len(held), "image_size": image_size, "budget_s": args.budget,
              "oracle_CIDEr": round(oracle, 4), "loadavg": loadavg()}
    print(json.dumps(header), flush=True)
    out = Path(args.out).resolve() / kind
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        waited = wait_idle(args.wait_idle, args.wait_max) if args.wait_idle is not None else 0.0
        name = f"{stamp}-{arm}" + (f"-{args.label}" if args.label else "")
        run_dir = out / name
        load_start = loadavg()
        if arm == "mmcap":
            result = run_mmcap(args, data_dir, image_size, run_dir, extra)
        elif arm == "plain":
            result = run_plain(args, data_dir, image_size, run_dir)
        else:
            raise SystemExit(f"unknown arm {arm!r}")
        predictions = result.pop("predictions")
        result.update(kind=kind, label=args.label if arm == "mmcap" else "", oracle_CIDEr=round(oracle, 4),
                      score=score(references, predictions, held), loadavg_start=load_start, loadavg_end=loadavg(),
                      waited_for_idle_s=waited, processor=header["processor"], mmcap=header["mmcap"],
                      budget_s=None if args.max_steps else args.budget, max_steps=args.max_steps or None,
                      threads=args.threads, seed=args.seed, image_size=image_size, extra_args=extra if arm == "mmcap" else [])
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        line = {k: v for k, v in result.items() if k not in ("curve", "profiler_top", "loss_every_50")}
        print(json.dumps(line), flush=True)
        rows.append(result)
    print(f"\nprocessor: {header['processor']}; torch {header['torch']}, {header['threads']} threads; "
          f"mmcap from {header['mmcap']}; budget {args.budget:.0f} s per arm\n")
    print(TABLE_HEAD)
    for r in rows:
        print(table_row(r))


if __name__ == "__main__":
    main()
