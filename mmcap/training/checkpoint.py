"""Checkpoint files that are never half-written, however the run dies.

Lightning's `TorchCheckpointIO` writes a temporary file in the system temp directory and moves it
onto the final name. Where that directory is on another filesystem than the checkpoints (a
node-local /tmp or RAM disk, checkpoints on shared storage: the usual cluster layout) the move is a
copy onto the final name, so a job killed during the copy leaves a truncated `last.ckpt` with the
previous one already gone, and its temporary file stays behind in /tmp.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `NAME.tmp` beside `NAME`, syncs it to disk and renames it over `NAME`.

    The rename stays within one directory, so it is atomic: `NAME` is always the previous complete
    checkpoint or the new one. A killed save leaves only `NAME.tmp`, which the next save of `NAME`
    replaces and `--ckpt_path last` never picks up. Remote paths (s3://, ...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        fs, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(local_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # a node that loses power must not leave a renamed empty file
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # some filesystems cannot sync a directory; the rename stands
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose files appear only when complete (see `AtomicCheckpointIO`).

    It installs `AtomicCheckpointIO` on the trainer unless another checkpoint IO (async, cloud) was
    chosen; `trainer.save_checkpoint` then writes atomically too.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath:
            remove_killed_saves(self.dirpath)


def remove_killed_saves(dirpath: str) -> None:
    """Delete the `*.ckpt.tmp` files that saves killed mid-write left in a local checkpoint directory
    (a killed `last.ckpt` save is overwritten by the next one; a best-score save's name may never recur)."""
    fs, local = url_to_fs(str(dirpath))
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(local):
        return
    for stray in Path(local).glob("*.ckpt.tmp"):
        log.warning("removing %s: the incomplete file of a save that was killed", stray)
        stray.unlink(missing_ok=True)
