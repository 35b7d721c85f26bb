"""Training-side commands: `mmcap fit|validate|test|predict` (LightningCLI), `eval`, `export`.

`mmcap fit --config configs/demo.yaml` composes the Trainer, `CaptionModule` (`--model.*`) and
`CaptionDataModule` (`--data.*`) from YAML files and `--section.key value` overrides. Beyond
LightningCLI's own keys it adds:

- `checkpoint.*`: the ModelCheckpoint (best `val/CIDEr` plus `last.ckpt`, each file written
  atomically: see `checkpoint.AtomicModelCheckpoint`); `checkpoint.dirpath`
  defaults to `<trainer.default_root_dir>/checkpoints`, the same for every run, so that
  `--ckpt_path last` finds the previous run's `last.ckpt`.
- `test_after_fit`: after `fit`, run the test split on the final weights and print the metrics.
- `export_dir`: after `fit`, write the final model there (`Captioner.save_pretrained` layout).

`data.image_size` and `data.max_caption_tokens` are linked to the model options of the same
name: set them under `data:` (the model's copies cannot be set separately).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import warnings
from collections import Counter
from typing import Optional

import torch


def lightning_main(argv: list[str]) -> int:
    from .module import NonFiniteLossError

    with warnings.catch_warnings():
        # mmcap passes its own argv on purpose, and sys.argv holds the same words.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        try:
            build_cli(argv)
        except NonFiniteLossError as e:
            print(f"mmcap: error: {e}", file=sys.stderr)
            return 1
        except pickle.UnpicklingError as e:
            print(f"mmcap: error: cannot load the checkpoint: {refused_pickle(e)}", file=sys.stderr)
            return 1
    return 0


def refused_pickle(e: pickle.UnpicklingError) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line."""
    lines = str(e).splitlines() or [""]
    detail = next((line.split("error: ", 1)[1] for line in lines if "WeightsUnpickler error: " in line), lines[0])
    return f"it holds pickled objects that could run code when loaded, not plain data ({detail.split('. ')[0]})"


def build_cli(argv: Optional[list[str]] = None, run: bool = True):
    """The LightningCLI; `run=False` only builds model, datamodule and trainer (no subcommand in `argv`)."""
    from lightning.pytorch.cli import LightningCLI

    from ..data.datamodule import CaptionDataModule
    from .module import CaptionModule

    class CaptionCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            from .checkpoint import AtomicModelCheckpoint

            parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
            parser.set_defaults({
                "checkpoint.monitor": "val/CIDEr",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step:07d}-cider{val/CIDEr:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            })
            parser.link_arguments("data.image_size", "model.image_size")
            parser.link_arguments("data.max_caption_tokens", "model.max_caption_tokens")
            parser.add_argument("--test_after_fit", type=bool, default=False,
                                help="After fit, test the final weights on data.test_shards and print the metrics.")
            parser.add_argument("--export_dir", type=Optional[str], default=None,
                                help="After fit, save the final model here (save_pretrained layout).")

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if cfg.get("checkpoint.dirpath") is None:
                root = cfg.get("trainer.default_root_dir") or os.getcwd()
                cfg["checkpoint.dirpath"] = os.path.join(root, "checkpoints")
            if "weights_only" in cfg and cfg.get("weights_only") is None:
                cfg["weights_only"] = True  # --ckpt_path: plain data only, whatever torch's default is

        def after_fit(self) -> None:
            cfg = self.config[self.subcommand]
            if cfg.get("test_after_fit"):
                results = self.trainer.test(self.model, datamodule=self.datamodule)
                if self.trainer.is_global_zero and results:
                    print("mmcap: final test metrics: " + json.dumps({k: round(v, 4) for k, v in results[0].items()}))
            if cfg.get("export_dir") and self.trainer.is_global_zero:
                self.model.captioner.save_pretrained(cfg.export_dir)
                print(f"mmcap: exported the final model to {cfg.export_dir}")

    return CaptionCLI(
        CaptionModule,
        CaptionDataModule,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},  # resuming writes into the same directories
        parser_kwargs={"prog": "mmcap"},
        auto_configure_optimizers=False,  # the module builds its own AdamW groups and schedule
    )


# ---------------------------------------------------------------------- mmcap export
def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcap export", description="Write a save_pretrained directory from a Lightning checkpoint.")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `mmcap fit` (e.g. runs/demo/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    try:
        captioner = captioner_from_checkpoint(args.ckpt)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"mmcap export: error: {e}", file=sys.stderr)
        return 1
    except pickle.UnpicklingError as e:
        print(f"mmcap export: error: {args.ckpt}: {refused_pickle(e)}", file=sys.stderr)
        return 1
    captioner.save_pretrained(args.out)
    print(f"mmcap export: wrote {args.out}")
    return 0


def captioner_from_checkpoint(path: str):
    """The `Captioner` of a CaptionModule checkpoint, read with `torch.load(weights_only=True)`."""
    from .module import CaptionModule

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    module = CaptionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return module.captioner.eval()


# ---------------------------------------------------------------------- mmcap eval
def eval_main(argv: list[str]) -> int:
    from ..cli import add_generation_args, generation_kwargs

    p = argparse.ArgumentParser(prog="mmcap eval", description="Caption metrics of a saved model on webdataset shards.")
    p.add_argument("--model", required=True, help="a save_pretrained directory")
    p.add_argument("--data", required=True, nargs="+",
                   help="shards: brace patterns (test-{000000..000003}.tar), globs, or several paths")
    p.add_argument("--json", action="store_true", help="print one JSON line with the metrics only")
    p.add_argument("--batch-size", "--batch_size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-meteor", "--no_meteor", action="store_true", help="skip METEOR (needs Java, slow to start)")
    add_generation_args(p)
    args = p.parse_args(argv)

    from ..captioner import Captioner
    from ..data.pipeline import iter_samples
    from ..images import eval_transform
    from .module import evaluate_captions

    try:
        model = Captioner.from_pretrained(args.model).to(args.device)
    except (OSError, ValueError) as e:
        print(f"mmcap eval: error: {e}", file=sys.stderr)
        return 1
    transform = eval_transform(model.config.image_size)
    skipped: Counter = Counter()
    references, predictions = {}, {}
    batch: list = []

    def flush() -> None:
        if any(ex.image is None for ex in batch):
            raise ValueError(f"{batch[0].key}: mmcap eval reads image shards; these hold precomputed features "
                             "(evaluate the model on the image shards they were made from)")
        pixels = torch.stack([transform(ex.image) for ex in batch]).to(args.device)
        captions = model.caption(pixels, batch_size=len(batch), **generation_kwargs(args))
        for ex, caption in zip(batch, captions):
            if ex.key not in predictions:
                predictions[ex.key], references[ex.key] = caption, ex.captions
        batch.clear()

    try:
        for example in iter_samples(args.data, skipped=skipped, min_image_size=model.config.image_size):
            batch.append(example)
            if len(batch) == args.batch_size:
                flush()
        if batch:
            flush()
    except (FileNotFoundError, ValueError) as e:
        print(f"mmcap eval: error: {e}", file=sys.stderr)
        return 1
    if skipped:
        print("mmcap eval: skipped " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())), file=sys.stderr)
    if not predictions:
        print("mmcap eval: error: no usable samples in --data", file=sys.stderr)
        return 1
    metrics = evaluate_captions(references, predictions, meteor=not args.no_meteor)
    if args.json:
        metrics.pop("exact_match")
        print(json.dumps(metrics))
    else:
        print(f"{len(predictions)} images")
        for name, value in metrics.items():
            print(f"{name:8s} {'n/a (no Java)' if value is None else f'{value:.4f}'}")
    return 0
