"""`CaptionPredictionWriter`: where `mmcap predict` puts its captions.

Each rank appends its results to `OUTPUT.rank<R>.jsonl`, batch by batch; at the end rank 0 merges
the rank files, in rank order, into OUTPUT (written under a temporary name, then renamed) and
removes them. The records are those of `mmcap caption --output`: `{"image": sample key, "shard",
"caption", "log_prob"}`, or `"error"` for an unusable image.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class CaptionPredictionWriter(BasePredictionWriter):
    def __init__(self, output: str | os.PathLike):
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.file = None

    def rank_file(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.rank{rank}.jsonl")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.rank_file(trainer.global_rank), "w", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        records = list(prediction) + list(batch.get("errors", []))
        self.file.write("".join(json.dumps(r) + "\n" for r in records))
        self.file.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.file.close()
        trainer.strategy.barrier("mmcap_predictions_written")
        if trainer.is_global_zero:
            self.merge(trainer.world_size)
        trainer.strategy.barrier("mmcap_predictions_merged")

    def merge(self, world_size: int) -> None:
        tmp = self.output.with_name(f".{self.output.name}.tmp")
        with open(tmp, "wb") as out:
            for rank in range(world_size):
                with open(self.rank_file(rank), "rb") as part:
                    shutil.copyfileobj(part, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.output)
        for rank in range(world_size):
            self.rank_file(rank).unlink()
        with open(self.output, "rb") as f:
            lines = sum(1 for _ in f)
        print(f"mmcap predict: wrote {lines} results to {self.output}")
