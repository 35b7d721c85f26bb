"""Where `mmcap caption --output` puts results: JSON Lines, COCO results JSON, or new shards.

Every writer survives being killed: JSON Lines records are flushed batch by batch (a killed run
leaves every finished record intact and at most a torn last line); the COCO array and each
output shard appear under their final names only when complete. With `resume=True` a writer
reads what an earlier run wrote (`done`: the results to skip, `earlier`: their tally) and
completes it, so that each image appears exactly once. Without it, an existing output is refused.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

from mmcap.data.shards import ShardFile
from mmcap.data.image_stream import WHOLE_SHARD, ResultId, result_id

FORMATS = ("jsonl", "coco", "shards")
CAPTION_MEMBER = "mmcap.json"  # what `--format shards` adds to each sample: {"caption", "log_prob"} or {"error"}
RECORD_FIELDS = ("image", "shard", "caption", "log_prob", "error", "detail")


def outcome(record: dict) -> str:
    """How a result is tallied: "captioned" or its error reason."""
    return record.get("error") or "captioned"


class JsonlWriter:
    """One JSON object per line: `{"image", "caption", "log_prob"}` (+ `"shard"`), or `"error"`."""

    def __init__(self, path: Union[str, os.PathLike], resume: bool = False):
        self.path = Path(path)
        self.done: set[ResultId] = set()
        self.earlier: Counter = Counter()
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise FileExistsError(f"{self.path} exists: pass --resume to complete it, or remove it")
            self._read_earlier()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")

    def _read_earlier(self) -> None:
        """Tally the earlier records and cut off a torn last line (a run killed mid-write)."""
        good_end, unterminated = 0, False
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    done = result_id(record)
                except (ValueError, KeyError, TypeError, AttributeError):
                    if f.read(1):  # not the last line: the damage is not from a kill
                        raise ValueError(f"{self.path}: line {line[:80]!r} is not a result record") from None
                    break
                good_end += len(line)
                unterminated = not line.endswith(b"\n")  # complete, but killed before its newline
                self.done.add(done)
                self.earlier[outcome(record)] += 1
        os.truncate(self.path, good_end)
        if unterminated:
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def write(self, records: Sequence[dict]) -> None:
        self.file.write("".join(json.dumps({k: r[k] for k in RECORD_FIELDS if k in r}) + "\n" for r in records))
        self.file.flush()

    def finish_shard(self, url: str) -> None:
        pass

    def close(self) -> None:
        self.file.close()


class CocoWriter(JsonlWriter):
    """COCO results, `[{"image_id", "caption"}]`, written atomically at the end; while running (and
    for `--resume`) the results go to `OUTPUT.progress.jsonl` beside it, which is kept."""

    def __init__(self, path: Union[str, os.PathLike], resume: bool = False):
        self.output = Path(path)
        if self.output.exists() and not resume:
            raise FileExistsError(f"{self.output} exists: pass --resume to complete it, or remove it")
        super().__init__(self.output.with_name(self.output.name + ".progress.jsonl"), resume)

    def close(self) -> None:
        """Write the array from the progress file, streaming (temporary name, then rename)."""
        super().close()
        tmp = self.output.with_name(f".{self.output.name}.tmp")
        with open(self.path, encoding="utf-8") as progress, open(tmp, "w", encoding="utf-8") as out:
            out.write("[")
            first = True
            for line in progress:
                record = json.loads(line)
                if "caption" in record:
                    out.write(("" if first else ",\n") + json.dumps({"image_id": coco_image_id(record["image"]),
                                                                    "caption": record["caption"]}))
                    first = False
            out.write("]\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.output)


_COCO_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d*_)?0*(\d+)$")


def coco_image_id(image: str) -> Union[int, str]:
    """COCO's integer id for COCO file names and keys (`000000397133.jpg`,
    `COCO_val2014_000000397133.jpg`); any other name stays as it is."""
    stem = Path(image).name.split(".")[0]
    match = _COCO_NAME.match(stem)
    return int(match.group(1)) if match else image


class ShardsWriter:
    """One output shard per input shard (same name, `.tar`), holding every sample's original
    members plus `KEY.mmcap.json`; each appears under its final name when complete, and
    `--resume` skips the input shards whose output exists."""

    def __init__(self, out_dir: Union[str, os.PathLike], shards: Sequence[str], resume: bool = False):
        self.out_dir = Path(out_dir)
        self.targets = {url: self.out_dir / output_shard_name(url, i) for i, url in enumerate(shards)}
        names = Counter(path.name for path in self.targets.values())
        clashes = sorted(name for name, n in names.items() if n > 1)
        if clashes:
            raise ValueError(f"several input shards would be written as {clashes[:3]}: give shards with distinct names")
        existing = [url for url, path in self.targets.items() if path.exists()]
        if existing and not resume:
            raise FileExistsError(f"{self.targets[existing[0]]} exists: pass --resume to complete {self.out_dir}, "
                                  "or remove it")
        self.done: set[ResultId] = {(url, WHOLE_SHARD) for url in existing}
        self.earlier: Counter = Counter({"shards": len(existing)}) if existing else Counter()
        self.open: dict[str, ShardFile] = {}
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, records: Sequence[dict]) -> None:
        for record in records:
            shard = self._shard(record["shard"])
            result = {k: record[k] for k in ("caption", "log_prob", "error", "detail") if k in record}
            members = {k: v for k, v in record["members"].items() if k != CAPTION_MEMBER}
            shard.write({"__key__": record["image"], **members, CAPTION_MEMBER: json.dumps(result).encode()})

    def _shard(self, url: str) -> ShardFile:
        if url not in self.open:
            self.open[url] = ShardFile(str(self.targets[url]))
        return self.open[url]

    def finish_shard(self, url: str) -> None:
        self._shard(url).close()  # an input shard without samples gives an empty output shard
        del self.open[url]

    def close(self) -> None:
        """Drop the shards left unfinished (an error stopped the run): only complete ones remain."""
        for shard in self.open.values():
            shard.abort()
        self.open.clear()


def output_shard_name(url: str, index: int) -> str:
    """`NAME.tar` for an input shard `.../NAME.tar[.gz]` (also inside `pipe:` commands and URLs)."""
    names = re.findall(r"([^/\s:]+?)\.(?:tar\.gz|tgz|tar)\b", url)
    return f"{names[-1]}.tar" if names else f"shard-{index:06d}.tar"


def open_writer(fmt: str, output: Union[str, os.PathLike], shards: Sequence[str] = (), resume: bool = False):
    if fmt == "jsonl":
        return JsonlWriter(output, resume)
    if fmt == "coco":
        return CocoWriter(output, resume)
    if fmt == "shards":
        return ShardsWriter(output, shards, resume)
    raise ValueError(f"unknown output format {fmt!r}; one of {FORMATS}")


def earlier_failures(earlier: Optional[Counter]) -> int:
    return sum(n for k, n in (earlier or {}).items() if k not in ("captioned", "shards"))
