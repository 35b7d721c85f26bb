"""Where captioned images come from: COCO, Karpathy splits, CSV/TSV/JSONL tables, folders.

Each source returns `Sample`s that point at image files; nothing is decoded here, so listing a
large dataset is quick and `write_shards` does the checking.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

from mmcap.images import IMAGE_EXTENSIONS
from mmcap.data.shards import Sample


def coco_samples(captions_json: str | Path, images_dir: str | Path) -> list[Sample]:
    """COCO `captions_*.json`: `images` (id, file_name) and `annotations` (image_id, caption)."""
    data = json.loads(Path(captions_json).read_text())
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"])
    return [
        Sample(
            key=Path(im["file_name"]).stem,
            image=Path(images_dir) / im["file_name"],
            captions=captions.get(im["id"], []),
            meta={"source": im["file_name"], "image_id": im["id"]},
        )
        for im in data["images"]
    ]


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def karpathy_samples(split_json: str | Path, images_dir: str | Path) -> dict[str, list[Sample]]:
    """Karpathy's `dataset_coco.json` (or flickr8k/30k): samples per split, restval in train.

    Images are looked up at `images_dir/filepath/filename`, then at `images_dir/filename`.
    """
    data = json.loads(Path(split_json).read_text())
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for im in data["images"]:
        split = KARPATHY_SPLITS.get(im.get("split", ""))
        if split is None:
            raise ValueError(f"{split_json}: image {im.get('filename')!r} has unknown split {im.get('split')!r}")
        path = Path(images_dir) / im.get("filepath", "") / im["filename"]
        if not path.exists():
            path = Path(images_dir) / im["filename"]
        meta = {"source": im["filename"]}
        if "cocoid" in im:
            meta["image_id"] = im["cocoid"]
        captions = [s.get("raw", "") for s in im.get("sentences", [])]
        splits[split].append(Sample(key=Path(im["filename"]).stem, image=path, captions=captions, meta=meta))
    return splits


def table_samples(
    table: str | Path,
    image_column: str = "image",
    caption_column: str = "caption",
    images_dir: Optional[str | Path] = None,
) -> list[Sample]:
    """Rows of a .csv, .tsv or .jsonl file; captions of the same image are grouped.

    Relative image paths are resolved against `images_dir`, or else the table's own directory.
    """
    table = Path(table)
    base = Path(images_dir) if images_dir is not None else table.parent
    rows = _read_table(table)
    grouped: dict[str, list[str]] = {}
    for line, row in enumerate(rows, start=1):
        for column in (image_column, caption_column):
            if column not in row:
                raise ValueError(f"{table}: row {line} has no column {column!r}; columns: {sorted(row)}")
        image = str(row[image_column] or "").strip()
        if not image:
            continue
        caption = row[caption_column]  # JSONL rows may hold a list of captions
        captions = caption if isinstance(caption, list) else [caption]
        grouped.setdefault(image, []).extend(c if isinstance(c, str) else "" for c in captions)
    return [
        Sample(key=str(Path(image).with_suffix("")), image=base / image, captions=captions, meta={"source": image})
        for image, captions in grouped.items()
    ]


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"{path}: tables must be .csv, .tsv or .jsonl")


def folder_samples(folder: str | Path) -> list[Sample]:
    """Images under `folder` (recursively) with a sidecar `.txt` holding one caption per line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    samples = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        sidecar = path.with_suffix(".txt")
        captions = sidecar.read_text(encoding="utf-8", errors="replace").splitlines() if sidecar.is_file() else None
        rel = path.relative_to(folder)
        samples.append(Sample(key=str(rel.with_suffix("")), image=path, captions=captions, meta={"source": str(rel)}))
    return samples
