"""`mmcap caption --engine ray`: files, folders, shards and Parquet files captioned on a Ray
cluster (or a local Ray), into a directory with one output file per input.

    inputs ─ units: each shard, each Parquet file, each group of `--files-per-output` image files
           │        (all files sorted, then cut): a unit's output is `NAME.parquet` (or `.jsonl`)
           ─ Ray Data: one row per unit
           ─ read_unit, CPU tasks: mmcap's own readers (`ImageStream`: the keys, error reasons and
           │                       skips of `mmcap caption`), uint8 pixels, one row per image (the
           │                       last one carries the unit's count)
           ─ CaptionBatches, `--concurrency` actors with `--gpus-per-worker` GPUs
           ─ this process: the rows of a unit gathered until its count is reached,
                           then its file written at once (temporary name, fsync, rename)

Exactly once: Ray retries lost tasks and restarts lost actors (its defaults for Ray Data) and
delivers each output block once; rows are keyed by (unit, index), so a row delivered twice is
kept once. A unit's file appears complete or not at all, named after its input; `--resume`
skips the units whose file exists and redoes the others whole, so each image appears exactly
once in the union of the files. `_mmcap_run.json` records the run (inputs, model, options): a
directory holding another run's output is refused, and `--resume` only completes the same run.
The files are written by this process, so only the inputs need to be visible to every node.

No scheduling, queueing or retrying of our own: Ray does all of it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from mmcap.data.image_stream import Inputs, plan_inputs
from mmcap.inference.ray_engine import (IMAGE_COLUMNS, KEY_COLUMNS, CaptionBatches, model_image_size,
                                        drafts, model_stage_options, pick_column, read_unit, require_ray)
from mmcap.inference.writers import RECORD_FIELDS, output_shard_name

MANIFEST, LOCK = "_mmcap_run.json", ".mmcap.lock"
RUN_FORMAT = "mmcap-caption-ray/1"
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("parquet", "jsonl")


@dataclass(frozen=True)
class Unit:
    """One input and its output file: a shard, a Parquet file or a group of image files."""
    name: str  # the output file's name without its extension
    kind: str  # "files", "shard" or "parquet"
    sources: tuple[str, ...]  # the paths or URLs, as given
    image_column: Optional[str] = None  # Parquet only
    key_column: Optional[str] = None


def plan_units(items: Sequence[str], files_per_output: int = 1000, image_column: Optional[str] = None,
               key_column: Optional[str] = None) -> list[Unit]:
    """The units of `items`: image files and folders (one unit per `files_per_output` files, all
    files sorted), shards (one each: `plan_inputs`) and Parquet files or globs (one each)."""
    parquet, rest = [], []
    for item in items:
        if str(item).endswith(PARQUET_SUFFIXES):
            matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            if not matches:
                raise FileNotFoundError(f"{item} matches no Parquet file")
            parquet += matches
        else:
            rest.append(str(item))
    inputs = plan_inputs(rest) if rest else Inputs()
    files = sorted(set(inputs.files))
    units = [Unit(f"files-{i // files_per_output:06d}", "files", tuple(files[i : i + files_per_output]))
             for i in range(0, len(files), files_per_output)]
    units += [Unit(output_shard_name(url, i)[: -len(".tar")], "shard", (url,)) for i, url in enumerate(inputs.shards)]
    units += [parquet_unit(path, image_column, key_column) for path in dict.fromkeys(parquet)]
    names = Counter(u.name for u in units)
    clashes = sorted(name for name, n in names.items() if n > 1)
    if clashes:
        raise ValueError(f"several inputs would be written as {clashes[:3]}: give inputs with distinct names")
    return units


def parquet_unit(path: str, image_column: Optional[str], key_column: Optional[str]) -> Unit:
    """A Parquet file's unit, its image (and key) columns picked from its schema."""
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
    image = pick_column(columns, image_column, IMAGE_COLUMNS, "image")
    if image is None:
        raise ValueError(f"{path}: no image column among {IMAGE_COLUMNS} (columns: {columns}): pass --image-column")
    return Unit(Path(path).stem, "parquet", (path,), image, pick_column(columns, key_column, KEY_COLUMNS, "key"))


# ---- the output directory ----


class OutputDir:
    """The run's directory: its manifest, a lock (one writer at a time), the units already
    complete (`done`, with their records tallied in `earlier`) and atomic per-unit writes."""

    def __init__(self, path: str, run: dict, units: Sequence[Unit], fmt: str, resume: bool):
        self.path, self.fmt = Path(path), fmt
        run = json.loads(json.dumps(run))  # as it reads back from the manifest (tuples as lists, ...)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        manifest = self.path / MANIFEST
        if manifest.exists():
            if not resume:
                raise FileExistsError(f"{self.path} holds the output of an earlier run: pass --resume to complete "
                                      "it, or write to another directory")
            earlier = json.loads(manifest.read_text())
            differ = sorted(k for k in set(earlier) | set(run) if earlier.get(k) != run.get(k))
            if differ:
                raise ValueError(f"{self.path} holds another run's output (it differs in {', '.join(differ)}): "
                                 "--resume completes the same run only")
        else:
            others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
            if others:
                raise FileExistsError(f"{self.path} holds other files ({', '.join(others[:3])}): write to an empty "
                                      "or new directory")
            self._replace(manifest, json.dumps(run, indent=1).encode())
        for stale in self.path.glob(".*.tmp"):  # a killed run's half-written file
            stale.unlink()
        self.done = {u.name for u in units if self.file(u.name).exists()}
        self.earlier: Counter = Counter()
        for name in sorted(self.done):
            self.earlier.update(outcome(r) for r in read_records(self.file(name)))

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not on Linux/macOS: no lock
            return
        self._lock_file = open(self.path / LOCK, "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another mmcap caption is writing to {self.path}") from None

    def file(self, name: str) -> Path:
        return self.path / f"{name}.{self.fmt}"

    def write(self, name: str, records: list[dict]) -> None:
        if self.fmt == "jsonl":
            data = "".join(json.dumps(r) + "\n" for r in records).encode()
        else:
            import io

            import pyarrow as pa
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(records, schema=parquet_schema()), buf)
            data = buf.getvalue()
        self._replace(self.file(name), data)

    def _replace(self, final: Path, data: bytes) -> None:
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)


def parquet_schema():
    import pyarrow as pa

    return pa.schema([(k, pa.float64() if k == "log_prob" else pa.string()) for k in RECORD_FIELDS])


def read_records(path: Path) -> list[dict]:
    """The records of one output file (JSON Lines or Parquet), with the fields that are set."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    import pyarrow.parquet as pq

    return [{k: v for k, v in r.items() if v is not None} for r in pq.read_table(path).to_pylist()]


def outcome(record: dict) -> str:
    return record.get("error") or "captioned"


class Assembler:
    """Gathers the rows of each unit (kept once per index) and writes its file when complete."""

    def __init__(self, out: OutputDir, units: dict[int, Unit], report_error):
        self.out, self.units, self.report_error = out, units, report_error
        self.rows: dict[int, dict[int, dict]] = defaultdict(dict)
        self.counts: dict[int, int] = {}
        self.tally: Counter = Counter()
        self.shard_errors: Counter = Counter()
        self.written = 0

    def add(self, rows: list[dict]) -> None:
        touched = set()
        for row in rows:
            unit = row["unit"]
            if unit not in self.units:  # written already: a duplicate delivery
                continue
            touched.add(unit)
            if row["count"] >= 0 and unit not in self.counts:  # the unit's last row
                self.counts[unit] = row["count"]
                self.shard_errors.update(json.loads(row["skipped"]) if row["skipped"] else {})
            if not row["end"]:
                self.rows[unit][row["index"]] = {k: row[k] for k in RECORD_FIELDS if row.get(k) not in (None, "")
                                                 or (k == "caption" and row.get(k) is not None)}
        for unit in touched:
            if unit in self.counts and len(self.rows[unit]) >= self.counts[unit]:
                self._finish(unit)

    def _finish(self, unit: int) -> None:
        rows = self.rows.pop(unit)
        records = [rows[i] for i in range(self.counts.pop(unit))]
        for record in records:
            self.tally[outcome(record)] += 1
            if "error" in record:
                self.report_error(record)
        self.out.write(self.units.pop(unit).name, records)
        self.written += 1

    @property
    def unfinished(self) -> list[str]:
        return sorted(u.name for u in self.units.values())


# ---- the command ----


def caption_on_ray(args) -> int:
    """`mmcap caption --engine ray` with the parsed `args` of `mmcap caption`; the exit status."""
    from mmcap.generation.config import generation_overrides

    def fail(message: str) -> int:
        print(f"mmcap caption: error: {message}", file=sys.stderr)
        return 1

    fmt = args.format or "parquet"
    if fmt not in FORMATS:
        return fail(f"--engine ray writes {' or '.join(FORMATS)} files, not {fmt}")
    if args.output is None:
        return fail("--engine ray writes a directory of files: give --output DIR")
    if args.concurrency < 1 or args.files_per_output < 1 or args.gpus_per_worker < 0 or args.batch_size < 1:
        return fail("--concurrency, --files-per-output and --batch-size take positive numbers, --gpus-per-worker "
                    "one of at least 0")
    options = generation_overrides(args)
    try:
        ray = require_ray()
        units = plan_units(args.images, args.files_per_output, args.image_column, args.key_column)
        if not units:
            raise ValueError("no images given")
        local = Path(args.model).expanduser()
        model = str(local.resolve()) if local.is_dir() else args.model
        image_size = model_image_size(model, args.revision)
        run = {"format": RUN_FORMAT, "model": args.model, "revision": args.revision, "precision": args.precision,
               "prompt": args.prompt, "generation": options, "output": fmt, "files_per_output": args.files_per_output,
               "units": len(units), "inputs_sha256": units_digest(units)}
        out = OutputDir(args.output, run, units, fmt, args.resume)
    except (ImportError, OSError, ValueError) as e:
        return fail(str(e))
    todo = {i: u for i, u in enumerate(units) if u.name not in out.done}

    started = time.perf_counter()
    local = not ray.is_initialized() and not args.ray_address  # a Ray of our own on this machine
    try:
        owned = start_ray(ray, args.ray_address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        return fail(f"cannot start or reach Ray ({args.ray_address or 'local'}): {e}")
    resources = ray.cluster_resources()
    print(f"mmcap caption: Ray ready in {time.perf_counter() - started:.1f} s ({resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs); {len(todo)} of {len(units)} inputs to caption", file=sys.stderr)
    threads = args.threads_per_worker or (max(1, len(os.sched_getaffinity(0)) // args.concurrency)
                                          if local and not args.gpus_per_worker else None)
    assembler = Assembler(out, todo, report_error)
    started = time.perf_counter()
    try:
        if todo:
            ds = ray.data.from_items([{"unit": i, **asdict(u)} for i, u in todo.items()], override_num_blocks=len(todo))
            ds = ds.flat_map(read_unit, fn_kwargs=dict(image_size=image_size, batch_size=args.batch_size,
                                                       root=os.getcwd(),
                                                       draft=drafts(args.precision, args.gpus_per_worker)),
                             num_cpus=1)
            ds = ds.map_batches(CaptionBatches, **model_stage_options(concurrency=args.concurrency,
                                                                      gpus_per_worker=args.gpus_per_worker,
                                                                      batch_size=args.batch_size),
                                fn_constructor_kwargs=dict(model=model, precision=args.precision,
                                                           revision=args.revision, num_threads=threads,
                                                           prompt=args.prompt, **options))
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                assembler.add(batch.to_pylist())
    except ray.exceptions.RayError as e:  # e.g. the model does not load on a node: the files written stay
        fail(f"the Ray job failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    finally:
        if owned:
            ray.shutdown()
    return summary(assembler, time.perf_counter() - started, out.earlier, len(out.done))


def units_digest(units: Sequence[Unit]) -> str:
    text = json.dumps([asdict(u) for u in units], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def start_ray(ray, address: Optional[str]) -> bool:
    """Connect to `address` ("auto": the cluster on this machine), or start a local Ray with this
    machine's CPUs; nothing where this process runs Ray already. Whether we started it."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # progress bars on a terminal, no progress log lines
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, logging_level=logging.WARNING)
    return True


def report_error(record: dict) -> None:
    detail = f" ({record['detail']})" if "detail" in record else ""
    where = f"{record['shard']}:" if "shard" in record else ""
    print(f"mmcap caption: error: {where}{record['image']}: {record['error']}{detail}", file=sys.stderr)


def summary(assembler: Assembler, seconds: float, earlier: Counter, done: int) -> int:
    """The summary line of `mmcap caption` on stderr; exit status 1 if an image failed (in this run
    or the earlier one) or an input was left unfinished."""
    tally = Counter(assembler.tally)
    captioned = tally.pop("captioned", 0)
    failed = tally + assembler.shard_errors
    line = f"mmcap caption: {captioned} captioned, {sum(failed.values())} failed"
    if failed:
        line += " (" + ", ".join(f"{k}={v}" for k, v in sorted(failed.items())) + ")"
    line += (f" in {seconds:.1f} s ({(captioned + sum(tally.values())) / max(seconds, 1e-9):.1f} images/s); "
             f"{assembler.written} files written")
    if done:
        line += f"; already written: {done} files (" + ", ".join(f"{k}={v}" for k, v in sorted(earlier.items())) + ")"
    print(line, file=sys.stderr)
    if assembler.unfinished:
        print(f"mmcap caption: error: {len(assembler.unfinished)} inputs unfinished ({assembler.unfinished[:3]}): "
              "run again with --resume", file=sys.stderr)
    earlier_failed = sum(n for k, n in earlier.items() if k != "captioned")
    return 1 if failed or earlier_failed or assembler.unfinished else 0
