"""`CaptionModule`: the LightningModule that trains and evaluates a `Captioner`.

It holds the training step, the optimiser and the caption metrics only. Its arguments are typed
blocks, each the config of one concern (a recipe's `model:` section has the same shape):

    captioner   CaptionerConfig: the model, exactly a saved model's config.json (or a preset file)
    optim       OptimConfig: learning rates, decay, warm-up and schedule, encoder freezing
    training    TrainingConfig: training-only options (label smoothing, SCST, init_from, ...)
    generation  GenerationConfig: the model's decoding defaults (saved with it, used by `test`)
    eval_generation  cheaper decoding for validation and test runs (default: `generation`)

The model itself is the plain `Captioner` in `self.captioner`, built in `setup()` (its tokenizer
may need the training captions) or from a checkpoint, which carries the model config and the
tokenizer files, so that `load_from_checkpoint`, resuming and `mmcap export` never need the
data or the hub. The datamodule is reached only through `TrainingData` (`mmcap.data.interface`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import Counter
from typing import Any, Optional

import lightning as L
import torch

from mmcap.captioner.model import Captioner
from mmcap.config import CaptionerConfig
from mmcap.data.interface import TrainingData
from mmcap.generation.config import GenerationConfig
from mmcap.model.lora import frozen_lm_weights
from mmcap.metrics import evaluate_captions
from mmcap.training.compile import compile_options, compiled_loss
from mmcap.training.config import TrainingConfig, coerce
from mmcap.training.contexts import frozen_encoder, token_dropout
from mmcap.training.scst import reward_scorer, self_critical_loss
from mmcap.training.checkpoint_entry import CHECKPOINT_KEY, captioner_from_entry, checkpoint_entry, with_frozen_lm_weights
from mmcap.training.callbacks import (NonFiniteGuard, ThroughputLogger, TimeBudgetSchedule, ValidationBudget,
                                      time_budget)
from mmcap.training.distributed import gather_from_ranks, gather_predictions
from mmcap.training.optim import OptimConfig, build_optimizer

log = logging.getLogger(__name__)


class CaptionModule(L.LightningModule):
    def __init__(
        self,
        captioner: CaptionerConfig = CaptionerConfig(),
        optim: OptimConfig = OptimConfig(),
        training: TrainingConfig = TrainingConfig(),
        generation: GenerationConfig = GenerationConfig(),
        eval_generation: Optional[GenerationConfig] = None,
    ):
        """
        Args:
            captioner: the model (`CaptionerConfig`; the CLI also takes a preset file path). Its
                `image_size` and `max_caption_tokens` are linked from `data.*` by the CLI.
            optim: learning rates, weight decay, warm-up + cosine schedule, encoder freezing.
            training: training-only options (see `TrainingConfig`).
            generation: the model's decoding defaults: used by `test`, saved with the model as
                generation_config.json, so `Captioner.caption` and `mmcap caption` start from them.
            eval_generation: decoding for validation and test inside training runs, when it should be
                cheaper than `generation` (greedy against beam 3, say). `mmcap eval` uses `generation`.
        """
        super().__init__()
        self.captioner_config: CaptionerConfig = coerce(CaptionerConfig, captioner)
        self.optim: OptimConfig = coerce(OptimConfig, optim)
        self.training_config: TrainingConfig = coerce(TrainingConfig, training)
        self.generation: GenerationConfig = coerce(GenerationConfig, generation)
        self.eval_generation: GenerationConfig = (self.generation if eval_generation is None
                                                 else coerce(GenerationConfig, eval_generation))
        # Plain types only: checkpoints are read back with torch.load(weights_only=True).
        self.save_hyperparameters(dict(
            captioner=self.captioner_config.to_dict(), optim=dataclasses.asdict(self.optim),
            training=dataclasses.asdict(self.training_config), generation=self.generation.to_dict(),
            eval_generation=None if eval_generation is None else self.eval_generation.to_dict(),
        ))
        self.captioner: Optional[Captioner] = None
        self._reward_scorer = None
        self._guard = NonFiniteGuard(self.training_config.max_bad_steps)
        self._skipped: Counter = Counter()
        self._eval_outputs: list[tuple[str, str, list[str]]] = []
        self._eval_loss = torch.zeros(2)
        self._grid: list[tuple[torch.Tensor, str, list[str]]] = []
        self._features_dir: Optional[str] = None  # training from precomputed encoder grids
        compile_options(self.training_config.compile)  # a bad value fails here, not at the first step
        self._compiled_loss = None  # `training.compile`: the captioner's loss through torch.compile

    @property
    def bad_steps(self) -> int:
        """Training steps skipped for a non-finite loss or gradient in this run."""
        return self._guard.bad_steps

    def configure_callbacks(self) -> list[L.Callback]:
        return [self._guard, ThroughputLogger(), TimeBudgetSchedule(), ValidationBudget()]

    # ------------------------------------------------------------------ building the model
    def _data(self) -> Optional[TrainingData]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and not isinstance(datamodule, TrainingData):
            raise TypeError(f"{type(datamodule).__name__} does not provide what CaptionModule needs from its data "
                            "(mmcap.data.interface.TrainingData): use CaptionDataModule or implement that interface")
        return datamodule

    def setup(self, stage: str) -> None:
        """Build the captioner for training; evaluation waits for a checkpoint (see `_require_model`)."""
        data = self._data()
        self._features_dir = data.features_dir if data is not None else None
        if self.captioner is None and stage == "fit":
            captioner = self.build_captioner(data)
            if self._features_dir is not None:
                from mmcap.training.features import use_feature_encoder

                use_feature_encoder(captioner, self._features_dir)
            self.set_captioner(captioner)
        elif self.captioner is not None:
            self.set_captioner(self.captioner)
        if stage == "fit" and self.training_config.scst is not None and self._reward_scorer is None:
            if data is None:
                raise ValueError("SCST takes CIDEr document frequencies from the training references: "
                                 "train with a datamodule (CaptionDataModule)")
            self._reward_scorer = reward_scorer(data.train_references())

    def build_captioner(self, data: Optional[TrainingData] = None) -> Captioner:
        """A new `Captioner` from this module's config. A decoder built from config trains its
        tokenizer from `data.train_captions()`; a pretrained one brings its own."""
        if self.training_config.init_from:
            captioner = Captioner.from_pretrained(self.training_config.init_from)
            captioner.generation_config = self.generation
            return captioner
        cfg = self.captioner_config
        captions = None
        if not cfg.decoder.pretrained:
            if data is None:
                raise ValueError(
                    "a decoder built from config trains its tokenizer from the training captions: use a "
                    "datamodule (CaptionDataModule), a checkpoint, or model.captioner.decoder.pretrained"
                )
            captions = data.train_captions(limit=self.training_config.tokenizer_max_captions)
        return Captioner.from_config(cfg, captions=captions, generation_config=self.generation)

    def set_captioner(self, captioner: Captioner) -> None:
        """Use `captioner` (e.g. one built in Python) and hand its tokenizer to the datamodule."""
        if self.training_config.channels_last:
            captioner.encoder.to(memory_format=torch.channels_last)
        if self._features_dir is not None:  # the encoder never runs: keep it out of optimizer and DDP
            captioner.encoder.set_freeze("all")
        captioner.generation_config = self.generation
        self.captioner = captioner
        self._compiled_loss = compiled_loss(captioner, self.training_config.compile)
        data = self._data()
        if data is not None:
            data.set_tokenizer(captioner.tokenizer)

    def _require_model(self) -> Captioner:
        if self.captioner is None:  # evaluation without a checkpoint: an untrained model
            # in the mode Lightning already put this module in (eval, for validate/test)
            self.set_captioner(self.build_captioner(self._data()).train(self.training))
        return self.captioner

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = entry = checkpoint_entry(self.captioner)
        if entry.get("lm_weights") == "pretrained":  # the LM's frozen weights reload from decoder.pretrained
            for name in frozen_lm_weights(self.captioner.decoder):
                checkpoint["state_dict"].pop(f"captioner.decoder.{name}", None)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, weights_only: bool = True, **kwargs) -> "CaptionModule":
        """Lightning's, but never unpickling code unless asked: mmcap checkpoints hold plain data only,
        and torch's own default can be switched off from the environment (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
        return super().load_from_checkpoint(checkpoint_path, *args, weights_only=weights_only, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the captioner exactly as saved (Lightning loads the weights right after)."""
        captioner = captioner_from_entry(checkpoint)
        self.captioner_config = captioner.config
        self.set_captioner(captioner)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint that left the LM's frozen weights out (see `on_save_checkpoint`) gets them from
        the model `on_load_checkpoint` built, which loaded them from decoder.pretrained."""
        if self.captioner is not None:
            state_dict = with_frozen_lm_weights(self.captioner, state_dict, prefix="captioner.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ training
    @property
    def fixed_schedule_length(self) -> bool:
        """model.optim.total_steps fixes the schedule; otherwise a time budget may shorten it."""
        return self.optim.total_steps is not None

    def configure_optimizers(self):
        total = self.optim.total_steps or self.trainer.estimated_stepping_batches
        if not total or total < 0 or math.isinf(total):
            if time_budget(self.trainer) is None:
                raise ValueError("the learning-rate schedule needs a length: set trainer.max_steps, "
                                 "trainer.max_time or model.optim.total_steps")
            # trainer.max_time alone: a first guess, re-estimated from the pace by TimeBudgetSchedule
            total = max(10 * self.optim.warmup_steps, 1000)
        optimizer, scheduler = build_optimizer(self.captioner, self.optim, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self.captioner.train()  # Lightning keeps whatever mode modules are in (a loaded model is in eval)

    @property
    def encoder_frozen(self) -> bool:
        return self.global_step < self.optim.freeze_encoder_steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pixels, memory = self._inputs(batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        opts = self.training_config
        with contextlib.ExitStack() as stack:
            if self.encoder_frozen:
                stack.enter_context(frozen_encoder(self.captioner.encoder))
            if opts.token_dropout > 0:
                stack.enter_context(token_dropout(self.captioner, opts.token_dropout))
            if opts.scst is not None:
                loss, stats = self_critical_loss(self.captioner, pixels, batch["references"], self._reward_scorer,
                                                 opts.scst, memory=memory, prompts=batch.get("prompts"))
                for name, value in stats.items():
                    self.log(f"train/scst_{name}", value, batch_size=len(batch["keys"]))
            else:
                loss = (self._compiled_loss or self.captioner)(
                    pixels, input_ids, attention_mask, label_smoothing=opts.label_smoothing, memory=memory,
                    labels=batch.get("labels"))
        if self.encoder_frozen and self.trainer.world_size > 1:
            # DDP expects a gradient for every parameter it registered: give the encoder zeros
            # (dropped again in on_before_optimizer_step).
            loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in self.captioner.encoder.parameters() if p.requires_grad)
        n = len(batch["keys"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self._log_data_skips(batch)
        for group in self.trainer.optimizers[0].param_groups:
            if not group.get("name", "").endswith("_no_decay"):  # same rate as its decayed twin
                self.log(f"train/lr_{group.get('name', 'group')}", group["lr"], batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """While the encoder is frozen, drop the zero gradients DDP gave it (see training_step).
        (Non-finite steps are skipped by the `NonFiniteGuard` callback, which runs first.)"""
        if self.encoder_frozen:
            for p in self.captioner.encoder.parameters():
                p.grad = None

    def _log_data_skips(self, batch: dict) -> None:
        skipped = batch.get("skipped") or {}
        if not skipped and not self._skipped:
            return
        self._skipped.update({k: int(v) for k, v in skipped.items()})
        n = len(batch["keys"])
        self.log("data/skipped", float(sum(self._skipped.values())), on_step=True, on_epoch=False, batch_size=n)
        for reason, count in self._skipped.items():
            self.log(f"data/skipped_{reason}", float(count), on_step=True, on_epoch=False, batch_size=n)

    def _inputs(self, batch: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(pixels, None) for an image batch; (None, image tokens) for a batch of precomputed grids."""
        if "features" in batch:
            if self._features_dir is None:
                raise ValueError("this batch holds precomputed features: set data.features_dir to the "
                                 "`mmcap features` directory, so that the model uses the encoder that made them")
            return None, self.captioner.project(batch["features"])
        if self._features_dir is not None:
            raise ValueError(f"data.features_dir is {self._features_dir} but this batch holds images: point the "
                             "shard options at that directory's feature shards (or leave them unset)")
        pixels = batch["pixels"]
        return (pixels.contiguous(memory_format=torch.channels_last) if self.training_config.channels_last else pixels), None

    # ------------------------------------------------------------------ evaluation
    def on_validation_start(self) -> None:
        self._require_model()

    on_test_start = on_predict_start = on_validation_start

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs, self._grid = [], []
        self._eval_loss = torch.zeros(2, device=self.device)  # loss sum, samples

    on_test_epoch_start = on_validation_epoch_start

    @torch.no_grad()
    def generate_captions(self, pixels: Optional[torch.Tensor], memory: Optional[torch.Tensor] = None,
                          generation: Optional[GenerationConfig] = None,
                          prompts: Optional[list[Optional[str]]] = None) -> list[str]:
        generation = generation or self.generation
        out = self.captioner.generate(pixels, memory=memory, prompt=prompts, **generation.to_dict())
        return [self.captioner.tokenizer.decode(out.sequences[i, : out.lengths[i]]) for i in range(len(out.lengths))]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict, stage: str) -> None:
        skipped = batch.get("skipped") or {}
        self._skipped.update({f"{stage}_{k}": int(v) for k, v in skipped.items()})
        if not batch["keys"]:  # every sample of this batch was unusable (the batch keeps ranks in step)
            return
        pixels, memory = self._inputs(batch)
        n = len(batch["keys"])
        if "input_ids" in batch:
            loss = self.captioner(pixels, batch["input_ids"], batch["attention_mask"], memory=memory,
                                  labels=batch.get("labels"))
            self._eval_loss += torch.stack([loss.detach().float() * n, loss.new_tensor(float(n))])
        captions = self.generate_captions(pixels, memory, self.eval_generation, batch.get("prompts"))
        self._eval_outputs += list(zip(batch["keys"], captions, batch["references"]))
        room = self.training_config.grid_images - len(self._grid)
        if room > 0 and self.global_rank == 0 and pixels is not None:
            self._grid += list(zip(batch["pixels"][:room].cpu(), captions, batch["references"]))[:room]

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", meteor=self.training_config.val_meteor)
        if not self.trainer.sanity_checking and self._grid:
            self._log_grid("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", meteor=True)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Results as `mmcap caption --output` writes them: `{"image": key, "caption", "log_prob"}`
        plus `"shard"` (see `mmcap.captioner.stream`), with the model's generation defaults. A sample whose
        json member has a `prompt` is captioned from that prompt, as `mmcap eval` does."""
        from mmcap.captioner.stream import caption_records

        if not batch["keys"]:  # every image of this batch was unusable (they are in batch["errors"])
            return []
        pixels, memory = self._inputs(batch)
        out = self.captioner.generate(pixels, memory=memory, prompt=batch.get("prompts"), **self.generation.to_dict())
        shards = batch.get("shards", [None] * len(batch["keys"]))
        return caption_records(self.captioner.tokenizer, out, batch["keys"], shards)

    def _log_metrics(self, stage: str, meteor: bool) -> None:
        """Caption metrics over every rank's samples, each sample counted once."""
        # Reduced here rather than by self.log(sync_dist=True) in the steps: a rank whose batches
        # were all empty never logs, and the others would wait for it forever.
        loss_sum, n = self.trainer.strategy.reduce(self._eval_loss, reduce_op="sum").tolist()
        if n > 0:
            self.log(f"{stage}/loss", loss_sum / n)
        references, predictions = gather_predictions(self._eval_outputs)
        self._eval_outputs = []
        metrics = None
        if self.global_rank == 0 and predictions:
            metrics = evaluate_captions(references, predictions, meteor=meteor)
            metrics["samples"] = len(predictions)  # distinct samples scored, over all ranks
        metrics = self.trainer.strategy.broadcast(metrics, src=0)  # every rank logs the same values
        for name, value in (metrics or {}).items():
            if value is not None:  # METEOR is None without Java
                self.log(f"{stage}/{name}", float(value), sync_dist=True)
        skipped = self._take_eval_skips(stage)
        if skipped:
            self.log(f"{stage}/skipped", float(sum(skipped.values())))
            for reason, count in sorted(skipped.items()):
                self.log(f"{stage}/skipped_{reason}", float(count))

    def _take_eval_skips(self, stage: str) -> Counter:
        """Unusable samples of this evaluation by reason, summed over ranks (the same on every rank,
        so that each logs the same keys), and forgotten here so they are never logged twice."""
        prefix = f"{stage}_"
        mine = Counter({k[len(prefix):]: v for k, v in self._skipped.items() if k.startswith(prefix)})
        for key in [k for k in self._skipped if k.startswith(prefix)]:
            del self._skipped[key]
        return sum((Counter(part) for part in gather_from_ranks(dict(mine))), Counter())

    def _log_grid(self, stage: str) -> None:
        from mmcap.inference.viz import caption_grid

        images, captions, refs = zip(*self._grid)
        figure = caption_grid(torch.stack(images), list(captions), [list(r) for r in refs])
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure(f"{stage}/captions", figure, global_step=self.global_step)
        self._grid = []
