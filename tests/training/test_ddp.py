"""CaptionModule + CaptionDataModule under real DDP: 2 CPU processes (ddp_spawn, gloo).

The run happens in a subprocess with a time limit, so a hang fails the test instead of the suite.
Each rank writes what it saw to a JSON file; the test compares the ranks.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

TESTS = os.pathsep.join([str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])])  # this test module and helpers.py


class RecordRank(L.Callback):
    """Writes rank<N>.json: training sample keys and steps per epoch, parameter checksums, val metrics."""

    def __init__(self, out_dir: str):
        self.out_dir, self.keys, self.steps = out_dir, [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.steps.append(0)
        self.keys.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys[-1] += batch["keys"]
        self.steps[-1] += 1

    def on_fit_end(self, trainer, pl_module):
        params = torch.cat([p.detach().flatten().double() for p in pl_module.captioner.parameters()])
        encoder = torch.cat([p.detach().flatten().double() for p in pl_module.captioner.encoder.parameters()])
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "keys": self.keys,
            "steps_per_epoch": self.steps,
            "global_step": trainer.global_step,
            "param_sum": params.sum().item(),
            "param_abs_sum": params.abs().sum().item(),
            "encoder_abs_sum": encoder.abs().sum().item(),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_ddp(out_dir: str, train: str, val: str, compile=False) -> None:
    """Runs inside the subprocess: 2 epochs on 2 CPU ranks, validation after each."""
    from helpers import module_args, tiny_config

    from mmcap.data.datamodule import CaptionDataModule
    from mmcap.training import CaptionModule

    L.seed_everything(0)
    cfg = tiny_config(decoder={"family": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                               "max_positions": 32, "dropout": 0.0}, image_size=32)
    module = CaptionModule(**module_args(**cfg, lr=1e-3, warmup_steps=1, freeze_encoder_steps=2,
                                       generation={"num_beams": 1, "max_new_tokens": 6}, grid_images=0,
                                       compile=compile))
    data = CaptionDataModule(train_shards=train, val_shards=val, image_size=32, batch_size=2, eval_batch_size=2,
                             num_workers=0, shuffle_buffer=4, max_caption_tokens=16)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[RecordRank(out_dir)], default_root_dir=out_dir)
    trainer.fit(module, datamodule=data)


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, {"backend": "aot_eager", "fullgraph": True}], ids=["eager", "compiled"])
def test_ddp_two_ranks_uneven_shards(make_caption_shards, tmp_path, compile):
    # 3 train shards of 4 samples on 2 ranks: rank 0 reads 2 shards, rank 1 one shard (and cycles it).
    # Compiled (`training.compile`): the compiled loss's gradients are averaged by DDP all the same.
    train, train_caps = make_caption_shards(n_shards=3, per_shard=4, name="train")
    val, val_caps = make_caption_shards(n_shards=1, per_shard=5, name="val")
    out = tmp_path / "out"
    out.mkdir()
    code = f"import test_ddp; test_ddp.run_ddp({str(out)!r}, {train!r}, {val!r}, {compile!r})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # every rank ran the same number of steps in each epoch (no hang, no rank running dry)
    assert ranks[0]["steps_per_epoch"] == ranks[1]["steps_per_epoch"] == [4, 4]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    # in each epoch each rank read its own shards; together they saw every training sample
    for epoch in (0, 1):
        keys0, keys1 = set(ranks[0]["keys"][epoch]), set(ranks[1]["keys"][epoch])
        assert not keys0 & keys1
        assert keys0 | keys1 == set(train_caps)
    # gradients were averaged: identical parameters on both ranks (the encoder trained too)
    for key in ("param_sum", "param_abs_sum", "encoder_abs_sum"):
        assert ranks[0][key] == ranks[1][key], key
    # validation metrics: every val sample once, the same values on both ranks
    assert ranks[0]["metrics"]["val/samples"] == len(val_caps) == 5
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert {"val/CIDEr", "val/BLEU-4", "val/ROUGE_L", "val/loss"} <= set(ranks[0]["metrics"])


def run_ddp_predict(out_dir: str, shards: str, model_dir: str) -> None:
    """Runs inside the subprocess: `predict` on 2 CPU ranks with the caption writer."""
    from mmcap import Captioner
    from mmcap.data.datamodule import CaptionDataModule
    from mmcap.training import CaptionModule
    from mmcap.training.predictions import CaptionPredictionWriter

    captioner = Captioner.from_pretrained(model_dir)
    module = CaptionModule(captioner=captioner.config, generation={"num_beams": 2, "max_new_tokens": 4})
    module.set_captioner(captioner)
    data = CaptionDataModule(predict_shards=shards, image_size=captioner.config.image_size, eval_batch_size=2,
                             num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out_dir,
                        callbacks=[CaptionPredictionWriter(f"{out_dir}/captions.jsonl")])
    trainer.predict(module, datamodule=data, return_predictions=False)


@pytest.mark.slow
def test_ddp_predict_writes_every_sample_once(tiny_gpt2, tmp_path):
    """3 shards of 3, 3 and 1 samples on 2 ranks (rank 0 reads 2 shards, rank 1 one): one merged file
    holding every sample exactly once, with the captions `Captioner.caption` gives."""
    from helpers import tiny_image_bytes

    from mmcap.data.shards import Sample, write_shards

    samples = [Sample(key=f"p{i}", image=tiny_image_bytes(i), captions=["x"]) for i in range(7)]
    write_shards(samples, str(tmp_path / "in" / "part-%06d.tar"), maxcount=3, progress=False)
    tiny_gpt2.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    code = (f"import test_ddp; test_ddp.run_ddp_predict({str(out)!r}, {str(tmp_path / 'in' / 'part-*.tar')!r}, "
            f"{str(tmp_path / 'model')!r})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == [s.key for s in samples]
    assert sorted(os.listdir(out)) == ["captions.jsonl"]  # the per-rank files were merged and removed
    shard_of = {r["image"]: Path(r["shard"]).name for r in rows}
    assert shard_of["p6"] == "part-000002.tar" and shard_of["p0"] == "part-000000.tar"
    pixels = torch.stack([tiny_gpt2.preprocess(s.image)[0][0] for s in samples])
    expected = tiny_gpt2.caption(pixels, num_beams=2, max_new_tokens=4)
    assert {r["image"]: r["caption"] for r in rows} == {s.key: c for s, c in zip(samples, expected)}
