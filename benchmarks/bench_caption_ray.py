"""`mmcap caption --engine ray` on one machine against `mmcap caption --num-workers 2`, in one run.

    python benchmarks/bench_caption_ray.py                      # 3,000 photo-like JPEGs, 2 CPUs, fp32
    python benchmarks/bench_caption_ray.py --n 300 --rounds 2 --root /tmp/bench-ray   # a shared machine: alternate
    python benchmarks/bench_caption_ray.py --gpus-per-worker 1  # on a GPU machine: GPU utilisation too

Both commands caption the same folder of photo-like 640x480 JPEGs with bench_caption's model
(ResNet-50 @224 + a GPT-2-small-shaped decoder, random weights, beam 3, exactly 20 new tokens,
batch 16; `models.build_mmcap`, saved once), at the same precision, each in a fresh process pinned
to the same `--cpus` CPUs (the local Ray then has that many). Per command it reports:

- `steady_captions_per_s`: images written after the first output appeared, over the time from
  then to the last (Ray: the first output file, of `--files-per-output` records; local: the first
  record of its JSON Lines file);
- `first_output_s`: from the process start to the first output (imports, model loading, and for
  Ray its start-up, of which `ray_ready_s` is the `ray.init` part, from the command's own line);
- peak memory in MiB: `driver` (the command's process), `workers` (Ray workers, or the local
  command's decode workers) and `ray_system` (gcs_server, raylet, ...) as the peak of their summed
  proportional set size (PSS: shared pages split between the processes that map them), and
  `object_store` as the growth of /dev/shm, where Ray's shared-memory store lives (a high-water
  mark: the store keeps pages it touched);
- with `--gpus-per-worker`: the mean GPU utilisation in the steady state (`nvidia-smi`).

The summary line gives Ray's rate over the local one per round (target: at least 0.75; with
`--rounds`, the commands alternate in order, so that a change in the machine's load hits both) and
the share of images whose captions are identical in the two outputs (fp32: all of them).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_caption_files import prepare
from measure import emit, log
from models import BATCH_SIZE, GENERATION

from mmcap.accel.timing import cpu_model

GENERATION_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in GENERATION.items()]
RAY_READY = re.compile(r"Ray ready in ([\d.]+) s")


def tree(root: int) -> list[int]:
    """`root` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def kind(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    full = b" ".join(words).decode(errors="replace")
    if full.startswith("ray::") or "default_worker.py" in full:
        return "workers"
    return "ray_system" if any(s in full for s in ("gcs_server", "raylet", "/ray/")) else "workers"


def shm_used_mb() -> float:
    return shutil.disk_usage("/dev/shm").used / 2**20


def gpu_utilisation() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class Watch:
    """Samples a command's processes while it runs: outputs written, PSS by kind, /dev/shm, GPU."""

    def __init__(self, cmd: list[str], cpus: set[int], count_outputs, gpu: bool):
        self.count_outputs, self.gpu = count_outputs, gpu
        self.shm0 = shm_used_mb()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self.peaks = {"driver": 0.0, "workers": 0.0, "ray_system": 0.0, "object_store": 0.0}
        self.first = self.last = None  # (seconds since start, outputs)
        self.gpu_samples: list[float] = []

    def run(self) -> str:
        import threading

        err: list[str] = []
        reader = threading.Thread(target=lambda: err.append(self.proc.stderr.read()), daemon=True)
        reader.start()
        while self.proc.poll() is None:
            self.sample()
            time.sleep(0.25)
        self.sample()
        reader.join()
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.proc.args} failed ({self.proc.returncode}):\n{err[0][-3000:]}")
        return err[0]

    def sample(self) -> None:
        now = time.perf_counter() - self.started
        done = self.count_outputs()
        if done and self.first is None:
            self.first = (now, done)
        if self.last is None or done > self.last[1]:
            self.last = (now, done)
        sums: dict[str, float] = {}
        for pid in tree(self.proc.pid):
            k = kind(pid, self.proc.pid)
            sums[k] = sums.get(k, 0.0) + pss_mb(pid)
        for k in ("driver", "workers", "ray_system"):
            self.peaks[k] = max(self.peaks[k], sums.get(k, 0.0))
        self.peaks["object_store"] = max(self.peaks["object_store"], shm_used_mb() - self.shm0)
        if self.gpu and self.first is not None:
            u = gpu_utilisation()
            if u is not None:
                self.gpu_samples.append(u)

    def result(self, n: int) -> dict:
        (t0, k0), (t1, k1) = self.first, self.last
        out = {"images": k1, "first_output_s": round(t0, 1), "first_output_images": k0,
               "steady_captions_per_s": round((k1 - k0) / max(t1 - t0, 1e-9), 3),
               "wall_s": round(time.perf_counter() - self.started, 1),
               "peak_mb": {k: round(v, 1) for k, v in self.peaks.items()}}
        if self.gpu_samples:
            out["gpu_utilisation_pct"] = round(sum(self.gpu_samples) / len(self.gpu_samples), 1)
        if k1 != n:
            raise RuntimeError(f"{k1} outputs, expected {n}")
        return out


def jsonl_lines(path: Path):
    def count() -> int:
        try:
            with open(path, "rb") as f:
                return sum(1 for line in f if line.endswith(b"\n"))
        except OSError:
            return 0
    return count


def ray_records(out: Path):
    seen: dict[str, int] = {}

    def count() -> int:
        for path in out.glob("files-*.jsonl") if out.is_dir() else ():
            if path.name not in seen:
                seen[path.name] = len(path.read_text().splitlines())
        return sum(seen.values())
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="photo-like JPEGs to caption")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto", "int8"])
    p.add_argument("--cpus", type=int, default=2, help="CPUs each command is pinned to (the local Ray's CPUs)")
    p.add_argument("--files-per-output", type=int, default=None, help="Ray: images per output file (default: about n/30, a multiple of the batch size)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="Ray: GPUs per model worker (local: --device cuda)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each command, in alternating order")
    p.add_argument("--root", default=None, help="keep photos and model here between runs (default: a temp dir)")
    args = p.parse_args()
    # about 30 output files, each a whole number of batches (units then line up with the model's batches)
    per_file = args.files_per_output or BATCH_SIZE * max(1, round(args.n / 30 / BATCH_SIZE))
    allowed = sorted(os.sched_getaffinity(0))
    cpus = set(allowed[: args.cpus])
    log(f"processor: {cpu_model()}; commands pinned to CPUs {sorted(cpus)}")

    with tempfile.TemporaryDirectory(prefix="mmcap-bench-ray-") as tmp:
        root = Path(args.root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        model_dir, folders = prepare(root, [args.n])
        folder = folders[args.n]
        common = ["--model", str(model_dir), "--batch-size", str(BATCH_SIZE), "--precision", args.precision,
                  *GENERATION_ARGS]
        gpu = args.gpus_per_worker > 0
        local_out, ray_out = root / "local.jsonl", root / "ray-out"
        commands = {
            "local": [sys.executable, "-m", "mmcap.cli", "caption", *common, "--output", str(local_out),
                      "--num-workers", "2", *(["--device", "cuda"] if gpu else []), str(folder)],
            "ray": [sys.executable, "-m", "mmcap.cli", "caption", "--engine", "ray", *common, "--output", str(ray_out),
                    "--format", "jsonl", "--files-per-output", str(per_file), "--concurrency", "1",
                    "--gpus-per-worker", str(args.gpus_per_worker), str(folder)]}
        for name, cmd in commands.items():
            log(f"{name}: " + " ".join(cmd))
        ratios, runs = [], []
        for round_ in range(args.rounds):  # alternating order: a change in the machine's load hits both
            rates = {}
            for name in (("local", "ray") if round_ % 2 == 0 else ("ray", "local")):
                local_out.unlink(missing_ok=True)
                shutil.rmtree(ray_out, ignore_errors=True)
                outputs = jsonl_lines(local_out) if name == "local" else ray_records(ray_out)
                watch = Watch(commands[name], cpus, outputs, gpu)
                err = watch.run()
                result = watch.result(args.n)
                if name == "ray":
                    ready = RAY_READY.search(err)
                    result["ray_ready_s"] = float(ready.group(1)) if ready else None
                    theirs = {r["image"]: r.get("caption") for f in ray_out.glob("*.jsonl")
                              for r in map(json.loads, f.read_text().splitlines())}
                else:
                    mine = {r["image"]: r.get("caption") for r in map(json.loads, local_out.read_text().splitlines())}
                rates[name] = result["steady_captions_per_s"]
                runs.append(emit({"benchmark": "caption_ray", "command": name, "round": round_, "n": args.n,
                                  "precision": args.precision, "cpus": args.cpus, **result}))
            ratios.append(round(rates["ray"] / rates["local"], 3))
        same = sum(mine.get(k) == v for k, v in theirs.items())
        ray_runs = [r for r in runs if r["command"] == "ray"]
        emit({"benchmark": "caption_ray_summary", "n": args.n, "precision": args.precision, "cpus": args.cpus,
              "files_per_output": per_file, "ray_over_local": ratios, "median": statistics.median(ratios),
              "ray_startup_s": {"ray_ready": [r["ray_ready_s"] for r in ray_runs],
                                "first_output": [r["first_output_s"] for r in ray_runs],
                                "local_first_output": [r["first_output_s"] for r in runs if r["command"] == "local"]},
              "records": {"local": len(mine), "ray": len(theirs)},
              "identical_captions": f"{same}/{len(theirs)}", "target": {"ray_over_local": 0.75}})

if __name__ == "__main__":
    main()
