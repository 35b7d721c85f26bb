"""`mmcap serve` under load: 16 concurrent clients against one client at a time, same server.

    python benchmarks/bench_serve.py            # one JSON line (about 3-6 minutes on 2 cores)

The model is bench_caption's (`models.build_mmcap`: ResNet-50 at 224 px + a decoder of GPT-2
small's shape, random weights), saved and served by `mmcap serve` in its own process at its
defaults (fp32, --max-batch-size 16). Every request uploads a 640x480 JPEG photo (multipart) and
asks for beam 3 and exactly 20 new tokens, like bench_caption. First one client sends requests
one after another, then 16 clients send theirs concurrently; the figures:

- ``captions_per_s_1`` / ``captions_per_s_16`` and their ``ratio`` (the issue's target: >= 3x);
- ``p50_ms`` / ``p95_ms`` latency of each phase, as a client sees it;
- ``batch_sizes``: how many requests the server decoded together (its X-Batch-Size header);
- ``server_peak_rss_mb``: the server process's peak resident memory (model included);
- ``captions_equal_offline``: every served caption equals ``Captioner.caption`` run offline in
  this process on the same files (batch 16, fp32), whichever batch it was served in.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from measure import emit, log, peak_rss_mb
from models import BATCH_SIZE, GENERATION, build_mmcap
from photos import make_photos


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "mmcap.cli", "serve", "--model", str(model_dir),
                               "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health").raise_for_status()
            return server
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)


def request(url: str, path: Path) -> tuple[str, float, int]:
    """(caption, seconds, batch size) of one multipart request."""
    fields = {k: str(v) for k, v in GENERATION.items()}
    start = time.perf_counter()
    r = httpx.post(f"{url}/caption", files={"image": path.read_bytes()}, data=fields, timeout=600)
    r.raise_for_status()
    return r.json()["caption"], time.perf_counter() - start, int(r.headers["x-batch-size"])


def phase(url: str, paths: list[Path], clients: int) -> dict:
    """Every path captioned once by `clients` concurrent clients (each sends its next request
    when the previous one is answered)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: request(url, p), paths))
    wall = time.perf_counter() - start
    latencies = sorted(seconds for _, seconds, _ in answers)

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    return {"captions": [caption for caption, _, _ in answers], "captions_per_s": len(paths) / wall,
            "p50_ms": pct(0.5), "p95_ms": pct(0.95), "batch_sizes": dict(Counter(size for _, _, size in answers))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--single", type=int, default=12, help="requests sent by the single client")
    p.add_argument("--concurrent", type=int, default=48, help="requests sent by the 16 clients together")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--server-args", default="", help="extra `mmcap serve` options, e.g. '--precision bf16'")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_mmcap()
        model.save_pretrained(tmp / "model")
        paths = make_photos(tmp / "photos", max(args.single, args.concurrent))
        log(f"offline captions of {len(paths)} photos")
        offline = dict(zip(paths, model.caption([str(q) for q in paths], batch_size=BATCH_SIZE, **GENERATION)))
        del model

        port = free_port()
        server = start_server(tmp / "model", port, args.server_args.split())
        url = f"http://127.0.0.1:{port}"
        try:
            request(url, paths[0])  # warm-up: first-call allocations, thread pools
            log(f"1 client, {args.single} requests")
            one = phase(url, paths[: args.single], 1)
            log(f"{args.clients} clients, {args.concurrent} requests")
            many = phase(url, paths[: args.concurrent], args.clients)
            peak = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(60)

    equal = (one["captions"] == [offline[q] for q in paths[: args.single]]
             and many["captions"] == [offline[q] for q in paths[: args.concurrent]])
    emit({
        "benchmark": "serve", "server_args": args.server_args, "clients": args.clients,
        "captions_per_s_1": round(one["captions_per_s"], 2), "captions_per_s_16": round(many["captions_per_s"], 2),
        "ratio": round(many["captions_per_s"] / one["captions_per_s"], 2),
        "p50_ms_1": one["p50_ms"], "p95_ms_1": one["p95_ms"], "p50_ms_16": many["p50_ms"], "p95_ms_16": many["p95_ms"],
        "batch_sizes_16": many["batch_sizes"], "server_peak_rss_mb": round(peak), "captions_equal_offline": equal,
    })
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
