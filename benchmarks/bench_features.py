"""Training the decoder from precomputed encoder features (`mmcap features`) vs from images with
the same encoder frozen. Prints one JSON line.

    python benchmarks/bench_features.py [--config configs/demo.yaml] [--model runs/demo/model] [--epochs 1]
    python benchmarks/bench_features.py --train-shards 'data/demo/train-00000[01].tar' \
        -- --model.captioner.encoder.arch resnet50 --data.image_size 224      # a frozen ResNet-50 at 224 px

Both runs are `mmcap fit` as the CLI builds it from the same config, start from the same weights
(a new projection and decoder, seeded alike; the encoder of `--model`, or of a new model from the
config when it is not given), read the same samples in the same order with the evaluation view
of each image (`data.augment false`, which is what features hold), and keep the encoder frozen.
Reported: wall seconds per training epoch (data loading included), the speed-up, the one-off
extraction time and after how many epochs it has paid for itself, and the result of each run
(final training loss, validation metrics with greedy decoding). `trainer_precision` is the
recipe's `trainer.precision` as resolved (`auto` -> bf16-mixed or 32-true on this machine).
"""
from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from fits import build_fit, quiet_fit_overrides
from measure import emit

from mmcap.training.features import extract_features, use_feature_encoder


class EpochTimer(L.Callback):
    def __init__(self):
        self.seconds, self.losses, self._start = [], [], None

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, module):
        self.seconds.append(time.perf_counter() - self._start)


def run(config: str, overrides: list[str], feature_dir: str, from_features: bool, train_shards: list[str]) -> dict:
    data_args = (["--data.features_dir", feature_dir] if from_features
                 else ["--data.augment", "false", *train_shards])
    model, data, trainer = build_fit(config, [*overrides, *data_args])
    data.prepare_data()
    torch.manual_seed(0)  # the same new projection and decoder in both runs
    captioner = model.build_captioner(data)
    use_feature_encoder(captioner, feature_dir)  # the same encoder in both runs
    model.set_captioner(captioner)
    timer = EpochTimer()
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=data)
    trainer.limit_val_batches = 1.0
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    return {"epoch_s": timer.seconds, "precision": trainer.precision,
            "final_loss": sum(timer.losses[-10:]) / len(timer.losses[-10:]),
            "val": {k.removeprefix("val/"): round(v, 4) for k, v in metrics.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--model", default=None, help="take the encoder of this saved model (default: a new one)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="storage type of the features")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="encoder precision while extracting (bf16-mixed training runs it in bf16 too)")
    p.add_argument("--root", default="runs/bench_features")
    p.add_argument("--train-shards", default=None, help="image shards to train on (default: the config's)")
    p.add_argument("extra", nargs="*", help="more --section.key value overrides for the config")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(args.root)
    overrides = [
        "--trainer.max_epochs", str(args.epochs), "--trainer.max_steps", "-1", *quiet_fit_overrides(root),
        "--model.optim.freeze_encoder_steps", str(10**9), *args.extra,
    ]
    train_shards = ["--data.train_shards", args.train_shards] if args.train_shards else []
    model, data, _ = build_fit(args.config, [*overrides, *train_shards])
    data.prepare_data()
    if args.model:
        from mmcap import Captioner

        source = Captioner.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        source = model.build_captioner(data)
    feature_dir = str(root / "features")
    if Path(feature_dir).exists():  # features of another run's encoder would be refused
        shutil.rmtree(feature_dir)
    start = time.perf_counter()
    summaries = {split: extract_features(source.encoder, getattr(data, f"{split}_shards"), feature_dir, split=split,
                                         image_size=data.image_size, dtype=args.dtype, precision=args.precision,
                                         progress=False)
                 for split in ("train", "val")}
    extraction_s = time.perf_counter() - start
    steps = -(-summaries["train"].samples // data.batch_size) * args.epochs  # the schedule's length
    overrides += ["--model.optim.total_steps", str(steps)]

    images = run(args.config, overrides, feature_dir, from_features=False, train_shards=train_shards)
    features = run(args.config, overrides, feature_dir, from_features=True, train_shards=train_shards)
    per_epoch_images = sum(images["epoch_s"]) / len(images["epoch_s"])
    per_epoch_features = sum(features["epoch_s"]) / len(features["epoch_s"])
    saved = per_epoch_images - per_epoch_features
    emit({
        "config": args.config,
        "encoder_from": args.model or "new model",
        "train_samples": summaries["train"].samples,
        "epochs": args.epochs,
        "trainer_precision": images["precision"],
        "extraction_s_train_and_val": round(extraction_s, 1),
        "feature_dtype": args.dtype,
        "extraction_precision": args.precision,
        "images_epoch_s": round(per_epoch_images, 2),
        "features_epoch_s": round(per_epoch_features, 2),
        "speedup_per_epoch": round(per_epoch_images / per_epoch_features, 2),
        "break_even_epochs": round(extraction_s / saved, 2) if saved > 0 else None,
        "images_final_loss": round(images["final_loss"], 4),
        "features_final_loss": round(features["final_loss"], 4),
        "images_val": images["val"],
        "features_val": features["val"],
    })


if __name__ == "__main__":
    main()
