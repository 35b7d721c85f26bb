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
- `predict_output`: where `mmcap predict --data.predict_shards ...` writes its captions (JSON Lines,
  one file per rank merged into one: see `predictions.CaptionPredictionWriter`).

`data.image_size` and `data.max_caption_tokens` are linked to `model.captioner.image_size` and
`model.captioner.max_caption_tokens`: set them under `data:` (the model's copies follow), so the
exported `config.json` records them. `--model.captioner configs/model/NAME.yaml` takes a preset
file in place of the inline block; `trainer.precision: auto` becomes `bf16-mixed` or `32-true`
by measuring this machine (`mmcap.accel.precision`).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import warnings
from typing import Optional, Union

import lightning as L
import torch


def lightning_main(argv: list[str]) -> int:
    from mmcap.training.callbacks import NonFiniteLossError

    with warnings.catch_warnings():
        # mmcap passes its own argv on purpose, and sys.argv holds the same words.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        # predict: CaptionPredictionWriter needs no batch indices, and a stream has none to give
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
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

    from mmcap.data.datamodule import CaptionDataModule
    from mmcap.training.module import CaptionModule

    class CaptionCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            from mmcap.training.checkpoint import AtomicModelCheckpoint

            parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
            parser.set_defaults({
                "checkpoint.monitor": "val/CIDEr",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step:07d}-cider{val/CIDEr:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            })
            parser.link_arguments("data.image_size", "model.captioner.image_size")
            parser.link_arguments("data.max_caption_tokens", "model.captioner.max_caption_tokens")
            parser.add_argument("--test_after_fit", type=bool, default=False,
                                help="After fit, test the final weights on data.test_shards and print the metrics.")
            parser.add_argument("--export_dir", type=Optional[str], default=None,
                                help="After fit, save the final model here (save_pretrained layout).")
            parser.add_argument("--predict_output", type=Optional[str], default=None,
                                help="predict: the JSON Lines file of captions (default: "
                                     "<trainer.default_root_dir>/predictions.jsonl).")

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if cfg.get("checkpoint.dirpath") is None:
                root = cfg.get("trainer.default_root_dir") or os.getcwd()
                cfg["checkpoint.dirpath"] = os.path.join(root, "checkpoints")
            if "weights_only" in cfg and cfg.get("weights_only") is None:
                cfg["weights_only"] = True  # --ckpt_path: plain data only, whatever torch's default is
            if self.subcommand == "predict" and cfg.get("return_predictions") is None:
                cfg["return_predictions"] = False  # the writer has them: memory stays flat

        def before_predict(self) -> None:
            from mmcap.training.predictions import CaptionPredictionWriter

            output = self.config["predict"].get("predict_output")
            output = output or os.path.join(self.trainer.default_root_dir, "predictions.jsonl")
            self.trainer.callbacks.append(CaptionPredictionWriter(output))

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
        trainer_class=Trainer,
    )


class Trainer(L.Trainer):
    """Lightning's Trainer, whose `precision` also takes "auto": `bf16-mixed` where bf16
    measured faster than fp32 on this machine (`mmcap.accel.precision`), else `32-true`."""

    def __init__(self, *args, precision: Optional[Union[str, int]] = None, **kwargs):
        from mmcap.accel.precision import trainer_precision

        kwargs["callbacks"] = with_steps_bar(kwargs.get("callbacks"), kwargs.get("enable_progress_bar"))
        super().__init__(*args, precision=trainer_precision(precision, kwargs.get("accelerator", "auto")), **kwargs)


def with_steps_bar(callbacks, enabled: Optional[bool]):
    """`callbacks` plus mmcap's progress bar (steps against the run's budget: `training.progress`),
    unless the bar is off or the user brought one."""
    from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

    from mmcap.training.progress import steps_bar

    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if enabled is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return callbacks
    return [*callbacks, steps_bar()]


# ---------------------------------------------------------------------- mmcap export
def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmcap export", description="Write a save_pretrained directory from a Lightning checkpoint.")
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `mmcap fit` (e.g. runs/demo/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    from mmcap.training.checkpoint_entry import captioner_from_checkpoint

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


