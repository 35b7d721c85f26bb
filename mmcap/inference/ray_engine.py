"""Captioning on a Ray cluster: the pieces that drop into a Ray Data batch-inference pipeline.

    import ray
    from mmcap.inference.ray_engine import caption_dataset

    ds = ray.data.read_webdataset(urls, decoder=None)  # or read_binary_files / read_images(include_paths=True) / read_parquet
    ds = caption_dataset(ds, "org/model", concurrency=4, gpus_per_worker=1, batch_size=32)
    ds.write_parquet("captions/")

`caption_dataset` adds the two stages of the field's batch-inference shape:
- `decode_row`, in CPU tasks: an image (bytes from webdataset members, `read_binary_files` or a
  Parquet column; an array from `read_images`) opened, cropped and resized as `Captioner.preprocess`
  does (`mmcap.images`), leaving uint8 pixels: a quarter of the floats' size in the object store;
- `CaptionBatches`, a callable class in `concurrency` actors (`num_gpus=gpus_per_worker`): it loads
  the model once per actor, resolves `precision` once into an inference plan, normalises the
  pixels and runs `Captioner.generate`. GPU actors never decode an image.

The rows that come out keep the input's other columns and add `image` (the key: `__key__`, `path`,
`key` or `id`), `caption` and `log_prob`, the fields of `mmcap caption --output`; an image that
cannot be used gives a row with `error` (a reason such as `unreadable_image`) and `detail`, never
an exception that fails the batch. At fp32 the captions are `Captioner.caption`'s on the same
images and options, exactly.

`mmcap caption --engine ray` (`mmcap.inference.ray_run`) reads its inputs with `read_unit`
instead of `decode_row`: mmcap's own readers (`ImageStream`: the keys, error reasons and skips of
`mmcap caption`) over one unit (a shard, a Parquet file or a group of image files) per task.

Ray is the optional extra `pip install "mmcap[ray]"`; nothing here imports it at module level.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image

from mmcap.images import ImageError, open_image, pixel_steps
from mmcap.data.image_stream import ImageStream
from mmcap.data.samples import MAX_IMAGE_BYTES, one_torch_thread
from mmcap.data.shardlist import is_url

RAY_EXTRA = 'pip install "mmcap[ray]"'
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "bytes", "img")  # the first present holds the image
KEY_COLUMNS = ("__key__", "path", "key", "id")  # the first present names it
RESULT_COLUMNS = ("caption", "log_prob", "error", "detail")


def require_ray():
    """The `ray` module with Ray Data, or an ImportError that says which extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"captioning on Ray needs Ray Data, the optional extra: {RAY_EXTRA} ({e})") from None
    return ray


# ---- decoding (CPU stage) ----


def image_pixels(value: Any, name: str, to_pixels: Callable, min_size: Optional[int] = None) -> np.ndarray:
    """uint8 pixels [3,S,S] of one image as Ray Data holds it: encoded bytes, a struct with
    `bytes` (Hugging Face datasets' Parquet), an array [H,W(,C)] (`read_images`) or a PIL image.
    `min_size`: a large JPEG may decode at a reduced scale down to this size (`Captioner`'s draft
    decoding in its lossy modes). Raises `ImageError` for anything unusable."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        raise ImageError(name, "missing_image")
    if isinstance(value, np.ndarray) and value.dtype != np.uint8 and value.dtype.kind in "OS":
        value = value.item() if value.ndim == 0 else bytes(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) > MAX_IMAGE_BYTES:
            raise ImageError(name, "too_large", f"{len(value)} bytes")
        image = open_image(bytes(value), name, min_size=min_size)
    elif isinstance(value, np.ndarray):
        try:
            image = open_image(Image.fromarray(np.ascontiguousarray(value)), name)
        except (TypeError, ValueError) as e:
            raise ImageError(name, "unreadable_image", f"{type(e).__name__}: {e}") from None
    elif isinstance(value, Image.Image):
        image = open_image(value, name)
    else:
        raise ImageError(name, "unreadable_image", f"a {type(value).__name__} is not an image")
    return to_pixels(image).numpy()


def pick_column(columns, wanted: Optional[str], candidates: tuple[str, ...], what: str) -> Optional[str]:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"no {what} column {wanted!r} (columns: {sorted(columns)})")
        return wanted
    return next((c for c in candidates if c in columns), None)


def decode_row(row: dict, *, image_size: int, image_column: Optional[str] = None,
               key_column: Optional[str] = None, draft: bool = False) -> list[dict]:
    """The CPU stage, for `Dataset.flat_map`: one row of a dataset read by Ray Data in, one row
    out with `pixels` (uint8 [3,S,S]; zeros where unusable), `image` (its key), `error` and
    `detail` ("" where usable); the row's other columns pass through, its image columns do not.

    Webdataset rows may hold any of several image members (`jpg`, `png`, ...): the first that is
    present in the row is read. (flat_map, not map: Ray fuses a map into the next stage where
    their resources match, and decoding would then run inside the model actors.)"""
    to_pixels, _ = pixel_steps(image_size)
    present = [image_column] if image_column else [c for c in IMAGE_COLUMNS if c in row]
    if image_column is None and not present:
        raise ValueError(f"no image column among {IMAGE_COLUMNS} (columns: {sorted(row)}): pass image_column=")
    key = pick_column(row, key_column, KEY_COLUMNS, "key")
    name = None if key is None else _text(row[key])
    out = {k: v for k, v in row.items() if k not in present and k not in IMAGE_COLUMNS}
    value = next((row[c] for c in present if row.get(c) is not None), None)
    out.update(image=name, pixels=np.zeros((3, image_size, image_size), np.uint8), error="", detail="")
    try:
        out["pixels"] = image_pixels(value, name or "<row>", to_pixels, min_size=image_size if draft else None)
    except ImageError as e:
        out.update(error=e.reason, detail=e.detail)
    return [out]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


# ---- mmcap's own inputs (CPU stage of `mmcap caption --engine ray`) ----


def read_unit(row: dict, *, image_size: int, batch_size: int, root: str, draft: bool = False) -> Iterator[dict]:
    """For `Dataset.flat_map`: a unit's row in (`mmcap.inference.ray_run.Unit`), a row per image
    out: `unit`, `index`, `image`, `shard`, uint8 `pixels`, `error`, `detail` ("" where they do not
    apply), and `count`: -1, but on the unit's last row its number of rows (and `skipped`, its
    shard-level skips as JSON). A unit without images gives one row with `end` set (no image).
    Files are read by their position in the unit, shard samples and Parquet rows in order;
    relative paths are taken from `root`, the driver's directory."""
    to_pixels, _ = pixel_steps(image_size)
    unit, kind, sources = int(row["unit"]), str(row["kind"]), [str(s) for s in row["sources"]]
    blank = np.zeros((3, image_size, image_size), np.uint8)
    skipped: Counter = Counter()
    if kind == "parquet":
        items = _parquet_items(sources[0], row["image_column"], row["key_column"], batch_size, root, to_pixels)
    else:
        items = _stream_items(kind, sources, image_size, batch_size, root, to_pixels, skipped, draft)
    def out(index, image, shard, pixels, error, detail, end=False) -> dict:
        return {"unit": unit, "index": index, "end": end, "count": -1, "skipped": "", "image": image, "shard": shard,
                "pixels": blank if pixels is None else pixels, "error": error, "detail": detail}

    held, count = None, 0
    for count, item in enumerate(items, 1):
        if held is not None:
            yield held
        held = out(*item)
    if held is None:  # nothing in this unit
        held = out(0, "", "", None, "", "", end=True)
    held.update(count=count, skipped=json.dumps(dict(skipped)) if skipped else "")
    yield held  # the last row carries the count: units line up with batches, no extra row


def _readable(source: str, root: str) -> str:
    return source if is_url(source) else os.path.join(root, os.path.expanduser(source))


class _CompactStream(ImageStream):
    """`ImageStream`, the reading of `mmcap caption`, leaving the pixels uint8 (before the float step)."""

    def __init__(self, *args, to_pixels: Callable, **kwargs):
        super().__init__(*args, **kwargs)
        self.to_pixels = to_pixels

    def _decode(self, source, name: str, transform):
        with one_torch_thread():
            return self.to_pixels(open_image(source, name, min_size=self.image_size if self.draft else None))


def _stream_items(kind, sources, image_size, batch_size, root, to_pixels, skipped: Counter, draft: bool = False):
    """(index, image, shard, pixels, error, detail) of a group of files or of one shard."""
    given = {_readable(s, root): s for s in sources}
    position = {path: i for i, path in enumerate(given)}
    files, shards = (list(given), []) if kind == "files" else ([], list(given))
    stream = _CompactStream(files, shards, image_size=image_size, batch_size=batch_size, to_pixels=to_pixels,
                            draft=draft)
    number = 0
    for batch in stream:
        skipped.update(batch["skipped"])
        items = [(key, shard, pixels.numpy(), "", "") for key, shard, pixels in
                 zip(batch["keys"], batch["shards"], batch["pixels"])]
        items += [(e["image"], e.get("shard"), None, e["error"], e.get("detail", "")) for e in batch["errors"]]
        for key, shard, pixels, error, detail in items:
            if shard is None:  # a file: named as given
                yield position[key], given[key], "", pixels, error, detail
            else:
                yield number, key, given[shard], pixels, error, detail
                number += 1


def _parquet_items(path, image_column, key_column, batch_size, root, to_pixels):
    """(index, image, shard, pixels, error, detail) of a Parquet file's rows; `shard` is its path."""
    import pyarrow.parquet as pq

    columns = [image_column] + ([key_column] if key_column else [])
    number = 0
    for part in pq.ParquetFile(_readable(path, root)).iter_batches(batch_size=batch_size, columns=columns):
        values = part.column(image_column).to_pylist()
        keys = part.column(key_column).to_pylist() if key_column else range(number, number + len(values))
        for value, key in zip(values, keys):
            name = _text(key)
            try:
                yield number, name, path, image_pixels(value, name, to_pixels), "", ""
            except ImageError as e:
                yield number, name, path, None, e.reason, e.detail
            number += 1


# ---- the model (actor stage) ----


class CaptionBatches:
    """For `Dataset.map_batches(CaptionBatches, fn_constructor_kwargs=..., batch_size=B,
    compute=ray.data.ActorPoolStrategy(size=N), num_gpus=G)`: captions a batch, keeping its other
    columns (`pixels` and raw image columns dropped) and adding `caption`, `log_prob`, `error` and
    `detail` (typed, null where they do not apply).

    The batch is either decoded (`pixels`, `image`, `error` from `decode_row` or mmcap's own
    readers; rows with an `error` or an `end` flag are passed through uncaptioned) or raw, as a Ray
    Data reader gives it (then it is decoded here first: fine on CPUs; on GPUs decode in a CPU
    stage, as `caption_dataset` does).

    The constructor runs once per actor: it sets torch's intra-op threads (`num_threads`; default
    the CPUs Ray assigned to the actor, which is also what Ray puts in OMP_NUM_THREADS), loads the
    model (`model`: a `save_pretrained` directory or Hub repo id, at `revision`) onto the actor's GPU
    if it has one, and resolves `precision` into one inference plan for every batch. `prompt` and
    the generation options mean what they mean to `Captioner.caption`.
    """

    def __init__(self, model: Union[str, Path], *, precision: str = "fp32", revision: Optional[str] = None,
                 device: Optional[str] = None, num_threads: Optional[int] = None, prompt: Optional[str] = None,
                 image_column: Optional[str] = None, key_column: Optional[str] = None, **generation_kwargs):
        from mmcap.accel.plan import as_plan
        from mmcap.captioner.model import Captioner

        torch.set_num_threads(max(1, num_threads or _assigned_cpus()))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = Captioner.from_pretrained(model, revision=revision).to(device).eval()
        self.plan = as_plan(precision, self.model.device)  # resolved once per actor
        self.options = self.model.generation_options(**generation_kwargs).to_dict()
        self.prompt = prompt
        self.decode_options = dict(image_size=self.model.config.image_size, image_column=image_column,
                                   key_column=key_column, draft=self.plan.draft)
        _, self.normalize = pixel_steps(self.model.config.image_size)

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa

        if "pixels" not in batch:
            batch = _decode_batch(batch, **self.decode_options)
        n = len(batch["pixels"])
        errors, details = _texts(batch.get("error"), n), _texts(batch.get("detail"), n)
        ends = batch.get("end")
        good = [i for i in range(n) if errors[i] is None and not (ends is not None and ends[i])]
        captions: list = [None] * n
        log_probs: list = [None] * n
        if good:
            with torch.no_grad():
                pixels = self.normalize(torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])))
                out = self.model.generate(pixels.to(self.model.device), precision=self.plan, prompt=self.prompt,
                                          **self.options)
            tokenizer = self.model.tokenizer
            for j, i in enumerate(good):
                captions[i] = tokenizer.decode(out.sequences[j, : out.lengths[j]])
                log_probs[i] = float(out.scores[j])
        result = {k: v for k, v in batch.items() if k not in ("pixels", *RESULT_COLUMNS)}
        result.update(caption=pa.array(captions, pa.string()), log_prob=pa.array(log_probs, pa.float64()),
                      error=pa.array(errors, pa.string()), detail=pa.array(details, pa.string()))
        return result


def _texts(column, n: int) -> list[Optional[str]]:
    """A column of optional text as a list: None for "", null and missing (a null column reads as NaN)."""
    return [v if isinstance(v, str) and v else None for v in (column if column is not None else [None] * n)]


def _decode_batch(batch: dict, **options) -> dict:
    """`decode_row` over a raw numpy batch, as one batch (the columns of the rows it returns)."""
    n = len(next(iter(batch.values())))
    rows = [decode_row({k: v[i] for k, v in batch.items()}, **options)[0] for i in range(n)]
    if not rows:
        return {"pixels": np.zeros((0, 3, options["image_size"], options["image_size"]), np.uint8)}
    out = {}
    for k in rows[0]:
        column = np.empty(n, dtype=object)  # one object per row, whatever it holds
        for i, r in enumerate(rows):
            column[i] = r[k]
        out[k] = column
    out["pixels"] = np.stack([r["pixels"] for r in rows])
    return out


def _assigned_cpus() -> int:
    """CPUs that Ray assigned to this actor (1 outside Ray, or when it gave a fraction)."""
    try:
        import ray

        return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
    except Exception:  # not in a Ray worker
        return 1


# ---- the two stages together ----


def drafts(precision: str, gpus_per_worker: float = 0) -> bool:
    """Whether the decode stage may draft-decode large JPEGs, as `Captioner.caption` does at this
    precision on the workers' device (`InferencePlan.draft`: wherever it computes below fp32)."""
    from mmcap.accel.precision import compute_dtype

    return compute_dtype(precision, "cuda" if gpus_per_worker else "cpu") != torch.float32


def model_image_size(model: Union[str, Path], revision: Optional[str] = None) -> int:
    """The image size of a saved model (its config.json), read without loading the weights."""
    from mmcap.config import CaptionerConfig
    from mmcap.model.hub import model_dir

    path = model_dir(model, revision) / "config.json"
    try:
        return CaptionerConfig.from_dict(json.loads(path.read_text())).image_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a mmcap model directory") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid mmcap config: {e}") from None


def model_stage_options(*, concurrency: int = 1, gpus_per_worker: float = 0, batch_size: int = 16,
                        cpus_per_worker: float = 1) -> dict:
    """`map_batches` arguments of the model stage: a fixed pool of `concurrency` actors. Ray Data
    restarts a lost actor and retries its batches (its defaults: max_restarts=-1, max_task_retries=-1)."""
    ray = require_ray()
    return dict(batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker)


def caption_dataset(ds, model: Union[str, Path], *, precision: str = "fp32", revision: Optional[str] = None,
                    concurrency: int = 1, gpus_per_worker: float = 0, batch_size: int = 16,
                    num_threads: Optional[int] = None, prompt: Optional[str] = None,
                    image_column: Optional[str] = None, key_column: Optional[str] = None, **generation_kwargs):
    """`ds` (rows holding an image: see the module docstring) with captions: the decode stage in
    CPU tasks, then `CaptionBatches` in `concurrency` actors with `gpus_per_worker` GPUs each.
    Rows keep their other columns; the result is lazy, like any Ray `Dataset`."""
    local = Path(model).expanduser()
    model = str(local.resolve()) if local.is_dir() else str(model)  # workers may run elsewhere
    decode = dict(image_size=model_image_size(model, revision), image_column=image_column, key_column=key_column,
                  draft=drafts(precision, gpus_per_worker))
    ds = ds.flat_map(decode_row, fn_kwargs=decode, num_cpus=1)
    return ds.map_batches(CaptionBatches, **model_stage_options(concurrency=concurrency,
                                                                gpus_per_worker=gpus_per_worker,
                                                                batch_size=batch_size),
                          fn_constructor_kwargs=dict(model=model, precision=precision, revision=revision,
                                                     num_threads=num_threads, prompt=prompt,
                                                     image_column=image_column, key_column=key_column,
                                                     **generation_kwargs))
