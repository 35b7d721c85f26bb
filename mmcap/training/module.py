"""`CaptionModule`: the LightningModule that trains and evaluates a `Captioner`.

It holds the training step, the optimiser and the caption metrics; the model itself is the plain
`Captioner` in `self.captioner`, built in `setup()` (its tokenizer may need the training captions)
or from a checkpoint, which carries the full model config and the tokenizer files, so that
`load_from_checkpoint`, resuming and `mmcap export` never need the data or the hub.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from torch import nn

from ..captioner import Captioner
from ..config import CaptionerConfig, DecoderConfig, EncoderConfig, ProjectionConfig, TokenizerConfig
from ..generation import GenerationConfig
from ..scst import SCSTConfig, reward_scorer, self_critical_loss
from ..tokenizer import CaptionTokenizer
from .optim import build_optimizer

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "mmcap"  # checkpoint entry with the model config and tokenizer files (plain types)


class NonFiniteLossError(RuntimeError):
    """Raised after `max_bad_steps` consecutive steps with a non-finite loss or gradient."""


class CaptionModule(L.LightningModule):
    def __init__(
        self,
        encoder: EncoderConfig = EncoderConfig(),
        projection: ProjectionConfig = ProjectionConfig(),
        decoder: DecoderConfig = DecoderConfig(),
        tokenizer: TokenizerConfig = TokenizerConfig(),
        image_size: int = 224,
        max_caption_tokens: int = 40,
        lr: float = 1e-4,
        encoder_lr_mult: float = 0.1,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.0,
        total_steps: Optional[int] = None,
        freeze_encoder_steps: int = 0,
        label_smoothing: float = 0.0,
        token_dropout: float = 0.0,
        max_bad_steps: int = 20,
        generation: GenerationConfig = GenerationConfig(num_beams=3),
        tokenizer_max_captions: Optional[int] = None,
        val_meteor: bool = False,
        grid_images: int = 8,
        channels_last: bool = False,
        init_from: Optional[str] = None,
        scst: Optional[SCSTConfig] = None,
    ):
        """
        Args:
            encoder, projection, decoder, tokenizer, image_size, max_caption_tokens: the `CaptionerConfig`
                parts (`image_size` is the resolution `Captioner.caption` uses; the CLI links it and
                `max_caption_tokens` to the data options of the same name).
            lr: peak learning rate of the decoder and projection.
            encoder_lr_mult: the encoder's learning rate is `lr * encoder_lr_mult`.
            weight_decay: AdamW decay of weight matrices (never biases, norms or embeddings).
            betas: AdamW betas.
            warmup_steps: linear warm-up length in optimizer steps, then cosine decay.
            min_lr_ratio: the cosine ends at `lr * min_lr_ratio`.
            total_steps: schedule length; default `trainer.max_steps` (or the trainer's estimate).
            freeze_encoder_steps: optimizer steps during which the whole encoder (BatchNorm
                statistics included) stays fixed before it trains too.
            label_smoothing: cross-entropy label smoothing.
            token_dropout: share of the decoder's input words (teacher forcing; never BOS) shown as
                UNK during training, so that each word is predicted more from the image than from
                the words before it: helps word combinations the training captions never had.
            max_bad_steps: consecutive non-finite steps (skipped) tolerated before raising.
            generation: decoding for validation/test/predict (transformers names: num_beams, ...).
            tokenizer_max_captions: training captions read to train a tokenizer (None: all).
            val_meteor: compute METEOR (Java, slow to start) at validation too; test always does.
            grid_images: images in the caption grid logged at each validation (0: none).
            channels_last: run the encoder in channels-last memory format (faster on CPUs and
                tensor cores).
            init_from: start from this `save_pretrained` directory instead of a new model (its
                config replaces the model options above), e.g. to fine-tune with SCST.
            scst: train with self-critical sequence training (CIDEr-D rewards, document
                frequencies from the training references) instead of cross-entropy.
        """
        super().__init__()
        cfg = CaptionerConfig.from_dict(dict(
            encoder=_plain(encoder), projection=_plain(projection), decoder=_plain(decoder),
            tokenizer=_plain(tokenizer), image_size=image_size, max_caption_tokens=max_caption_tokens,
        ))
        self.model_config = cfg
        self.scst = scst if scst is None or isinstance(scst, SCSTConfig) else SCSTConfig(**_plain(scst))
        self._reward_scorer = None
        self.generation = generation if isinstance(generation, GenerationConfig) else GenerationConfig(**_plain(generation))
        # Plain types only: checkpoints are read back with torch.load(weights_only=True).
        self.save_hyperparameters(dict(
            cfg.to_dict(), lr=lr, encoder_lr_mult=encoder_lr_mult, weight_decay=weight_decay, betas=list(betas),
            warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, total_steps=total_steps,
            freeze_encoder_steps=freeze_encoder_steps, label_smoothing=label_smoothing, token_dropout=token_dropout,
            max_bad_steps=max_bad_steps,
            generation=dataclasses.asdict(self.generation), tokenizer_max_captions=tokenizer_max_captions,
            val_meteor=val_meteor, grid_images=grid_images, channels_last=channels_last, init_from=init_from,
            scst=dataclasses.asdict(self.scst) if self.scst is not None else None,
        ))
        self.captioner: Optional[Captioner] = None
        self.bad_steps = 0  # skipped non-finite steps in this run
        self._consecutive_bad = 0
        self._nonfinite_loss = torch.zeros((), dtype=torch.bool)
        self._skipped: Counter = Counter()
        self._last_step_time: Optional[float] = None
        self._eval_outputs: list[tuple[str, str, list[str]]] = []
        self._eval_loss = torch.zeros(2)
        self._grid: list[tuple[torch.Tensor, str, list[str]]] = []
        self._features_dir: Optional[str] = None  # training from precomputed encoder grids

    # ------------------------------------------------------------------ building the model
    def setup(self, stage: str) -> None:
        """Build the captioner for training; evaluation waits for a checkpoint (see `_require_model`)."""
        datamodule = self.trainer.datamodule
        self._features_dir = getattr(datamodule, "features_dir", None)
        if self.captioner is None and stage == "fit":
            captioner = self.build_captioner(datamodule)
            if self._features_dir is not None:
                use_feature_encoder(captioner, self._features_dir)
            self.set_captioner(captioner)
        elif self.captioner is not None:
            self.set_captioner(self.captioner)
        if stage == "fit" and self.scst is not None and self._reward_scorer is None:
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "train_references"):
                raise ValueError("SCST takes CIDEr document frequencies from the training references: use "
                                 "a datamodule with `train_references()` (CaptionDataModule)")
            self._reward_scorer = reward_scorer(datamodule.train_references())

    def build_captioner(self, datamodule=None) -> Captioner:
        """A new `Captioner` from this module's config. A decoder built from config trains its
        tokenizer from `datamodule.train_captions()`; a pretrained one brings its own."""
        if self.hparams.init_from:
            return Captioner.from_pretrained(self.hparams.init_from)
        cfg = CaptionerConfig.from_dict(self.model_config.to_dict())
        captions = None
        if not cfg.decoder.pretrained:
            if datamodule is None or not hasattr(datamodule, "train_captions"):
                raise ValueError(
                    "a decoder built from config trains its tokenizer from the training captions: use a "
                    "datamodule with `train_captions()` (CaptionDataModule), a checkpoint, or decoder.pretrained"
                )
            captions = datamodule.train_captions(limit=self.hparams.tokenizer_max_captions)
        return Captioner.from_config(cfg, captions=captions)

    def set_captioner(self, captioner: Captioner) -> None:
        """Use `captioner` (e.g. one built in Python) and hand its tokenizer to the datamodule."""
        if self.hparams.channels_last:
            captioner.encoder.to(memory_format=torch.channels_last)
        if self._features_dir is not None:  # the encoder never runs: keep it out of optimizer and DDP
            captioner.encoder.set_freeze("all")
        self.captioner = captioner
        self._share_tokenizer()

    def _share_tokenizer(self) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "tokenizer"):
            datamodule.tokenizer = self.captioner.tokenizer

    def _require_model(self) -> Captioner:
        if self.captioner is None:  # evaluation without a checkpoint: an untrained model
            # in the mode Lightning already put this module in (eval, for validate/test)
            self.set_captioner(self.build_captioner(self.trainer.datamodule).train(self.training))
        return self.captioner

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "config": self.captioner.config.to_dict(),  # includes the decoder's full HF config
            "tokenizer": tokenizer_to_files(self.captioner.tokenizer),
        }

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, weights_only: bool = True, **kwargs) -> "CaptionModule":
        """Lightning's, but never unpickling code unless asked: mmcap checkpoints hold plain data only,
        and torch's own default can be switched off from the environment (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
        return super().load_from_checkpoint(checkpoint_path, *args, weights_only=weights_only, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the captioner exactly as saved (Lightning loads the weights right after)."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("this checkpoint was not written by mmcap's CaptionModule: it has no model config/tokenizer")
        cfg = CaptionerConfig.from_dict(saved["config"])
        self.model_config = CaptionerConfig.from_dict(saved["config"])
        self.set_captioner(Captioner(cfg, tokenizer_from_files(saved["tokenizer"]), load_pretrained=False))

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        total = hp.total_steps or self.trainer.estimated_stepping_batches
        if not total or total < 0 or math.isinf(total):
            raise ValueError("the learning-rate schedule needs a length: set trainer.max_steps or model.total_steps")
        optimizer, scheduler = build_optimizer(
            self.captioner, hp.lr, hp.weight_decay, hp.encoder_lr_mult, tuple(hp.betas), hp.warmup_steps,
            int(total), hp.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self.captioner.train()  # Lightning keeps whatever mode modules are in (a loaded model is in eval)

    @property
    def encoder_frozen(self) -> bool:
        return self.global_step < self.hparams.freeze_encoder_steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pixels, memory = self._inputs(batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        with contextlib.ExitStack() as stack:
            if self.encoder_frozen:
                stack.enter_context(self._frozen_encoder())
            if self.hparams.token_dropout > 0:
                stack.enter_context(self._token_dropout(self.hparams.token_dropout))
            if self.scst is not None:
                loss, stats = self_critical_loss(self.captioner, pixels, batch["references"], self._reward_scorer,
                                                 self.scst, memory=memory)
                for name, value in stats.items():
                    self.log(f"train/scst_{name}", value, batch_size=len(batch["keys"]))
            else:
                loss = self.captioner(pixels, input_ids, attention_mask, label_smoothing=self.hparams.label_smoothing,
                                      memory=memory)
        if self.encoder_frozen and self.trainer.world_size > 1:
            # DDP expects a gradient for every parameter it registered: give the encoder zeros
            # (dropped again in on_before_optimizer_step).
            loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in self.captioner.encoder.parameters() if p.requires_grad)
        self._nonfinite_loss = self._nonfinite_loss.to(loss.device) | ~torch.isfinite(loss.detach())
        n = len(batch["keys"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self._log_data_skips(batch)
        for group in self.trainer.optimizers[0].param_groups:
            if not group.get("name", "").endswith("_no_decay"):  # same rate as its decayed twin
                self.log(f"train/lr_{group.get('name', 'group')}", group["lr"], batch_size=n)
        return loss

    @contextlib.contextmanager
    def _frozen_encoder(self) -> Iterator[None]:
        """No gradients into the encoder and BatchNorm statistics fixed, for one forward pass.

        The parameters stay in the optimizer (and in DDP's reducer) all along, so unfreezing is
        just the end of this context.
        """
        encoder = self.captioner.encoder
        params = list(encoder.parameters())
        flags, was_training = [p.requires_grad for p in params], encoder.training
        encoder.eval()
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            encoder.train(was_training)

    @contextlib.contextmanager
    def _token_dropout(self, rate: float) -> Iterator[None]:
        """Replace input word embeddings by UNK's (the targets stay intact), for one forward pass."""
        embedding = self.captioner.decoder.get_input_embeddings()
        tok = self.captioner.tokenizer
        unk = tok.hf.unk_token_id if tok.hf.unk_token_id is not None else tok.pad_id

        def drop_words(module, args, output):
            ids = args[0]
            drop = (torch.rand(ids.shape, device=ids.device) < rate) & (ids != tok.bos_id)
            return torch.where(drop[..., None], module.weight[unk].to(output.dtype), output)

        handle = embedding.register_forward_hook(drop_words)
        try:
            yield
        finally:
            handle.remove()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip (drop all gradients of) a step whose loss or gradients are not finite, on every rank."""
        if self.encoder_frozen:
            for p in self.captioner.encoder.parameters():
                p.grad = None
        bad = bool(self._nonfinite_loss)
        # Under a GradScaler (16-mixed) overflowing gradients are routine: the scaler skips those.
        if not _uses_grad_scaler(self.trainer):
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            bad = bad or not bool(torch.isfinite(grad_norm))
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)  # the same decision on every rank
        self._nonfinite_loss = torch.zeros((), dtype=torch.bool)
        if not bad:
            self._consecutive_bad = 0
            return
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without .grad untouched
        self.bad_steps += 1
        self._consecutive_bad += 1
        self.log("train/bad_steps", float(self.bad_steps), on_step=True, on_epoch=False)
        if self._consecutive_bad >= self.hparams.max_bad_steps:
            raise NonFiniteLossError(
                f"{self._consecutive_bad} consecutive training steps had a non-finite loss or gradient (step "
                f"{self.global_step}); the run is diverging or the data is broken. Try a lower model.lr, "
                "gradient clipping (trainer.gradient_clip_val), bf16-mixed instead of 16-mixed, or check the data."
            )

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            dt = now - self._last_step_time
            world = self.trainer.world_size
            n = len(batch["keys"])
            self.log("train/samples_per_s", n * world / dt, on_step=True, on_epoch=False, batch_size=n)
            tokens = batch["attention_mask"][:, 1:].sum().float()  # predicted tokens
            self.log("train/tokens_per_s", tokens * world / dt, on_step=True, on_epoch=False, batch_size=n)
        self._last_step_time = now

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

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
        return (pixels.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else pixels), None

    # ------------------------------------------------------------------ evaluation
    def on_validation_start(self) -> None:
        self._require_model()

    on_test_start = on_predict_start = on_validation_start

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs, self._grid = [], []
        self._eval_loss = torch.zeros(2, device=self.device)  # loss sum, samples

    on_test_epoch_start = on_validation_epoch_start

    @torch.no_grad()
    def generate_captions(self, pixels: Optional[torch.Tensor], memory: Optional[torch.Tensor] = None) -> list[str]:
        out = self.captioner.generate(pixels, memory=memory, **dataclasses.asdict(self.generation))
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
            loss = self.captioner(pixels, batch["input_ids"], batch["attention_mask"], memory=memory)
            self._eval_loss += torch.stack([loss.detach().float() * n, loss.new_tensor(float(n))])
        captions = self.generate_captions(pixels, memory)
        self._eval_outputs += list(zip(batch["keys"], captions, batch["references"]))
        room = self.hparams.grid_images - len(self._grid)
        if room > 0 and self.global_rank == 0 and pixels is not None:
            self._grid += list(zip(batch["pixels"][:room].cpu(), captions, batch["references"]))[:room]

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", meteor=self.hparams.val_meteor)
        if not self.trainer.sanity_checking and self._grid:
            self._log_grid("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", meteor=True)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, str]]:
        captions = self.generate_captions(*self._inputs(batch))
        return [{"key": k, "caption": c} for k, c in zip(batch["keys"], captions)]

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
        from ..viz import caption_grid

        images, captions, refs = zip(*self._grid)
        figure = caption_grid(torch.stack(images), list(captions), [list(r) for r in refs])
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure(f"{stage}/captions", figure, global_step=self.global_step)
        self._grid = []


def use_feature_encoder(captioner: Captioner, features_dir: str) -> None:
    """Give `captioner` the frozen encoder (weights, config, image size) that made `features_dir`,
    so that the model trained from those features captions images as it was trained."""
    from ..features import load_encoder

    encoder, info = load_encoder(features_dir)
    if encoder.cfg.arch != captioner.config.encoder.arch:
        raise ValueError(f"{features_dir} holds {info.encoder.arch} features but model.encoder.arch is "
                         f"{captioner.config.encoder.arch}: set model.encoder.arch: {info.encoder.arch}")
    captioner.encoder.load_state_dict(encoder.state_dict())
    captioner.config.encoder = dataclasses.replace(info.encoder, freeze="all")
    if captioner.config.image_size != info.image_size:
        log.warning("features were made at %d px: the model's image_size %d is set to %d",
                    info.image_size, captioner.config.image_size, info.image_size)
        captioner.config.image_size = info.image_size


def evaluate_captions(references: dict[str, list[str]], predictions: dict[str, str], meteor: bool = True) -> dict:
    """`mmcap.metrics.caption_metrics` plus `exact_match`: the share of predictions equal to one of
    their references (case and spacing ignored)."""
    from ..metrics import caption_metrics

    metrics = dict(caption_metrics(references, predictions, meteor=meteor))
    metrics["exact_match"] = exact_match_rate(references, predictions)
    return metrics


def exact_match_rate(references: dict[str, list[str]], predictions: dict[str, str]) -> float:
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    hits = sum(norm(p) in {norm(r) for r in references[k]} for k, p in predictions.items())
    return hits / max(1, len(predictions))


def gather_from_ranks(obj: Any) -> list:
    """`obj` of every rank, in rank order (`[obj]` outside distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return [obj]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def gather_predictions(outputs: list[tuple[str, str, list[str]]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(references, predictions) by sample key from all ranks; a key seen twice (a sample repeated
    to even out the ranks) counts once."""
    outputs = [item for part in gather_from_ranks(outputs) for item in part]
    references, predictions = {}, {}
    for key, caption, refs in outputs:
        if key not in predictions:
            predictions[key], references[key] = caption, list(refs)
    return references, predictions


def tokenizer_to_files(tokenizer: CaptionTokenizer) -> dict[str, str]:
    """The tokenizer's files as {name: text}: plain strings fit a weights_only checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def tokenizer_from_files(files: dict[str, str]) -> CaptionTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            if Path(name).name != name:
                raise ValueError(f"bad tokenizer file name in checkpoint: {name!r}")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        return CaptionTokenizer.load(tmp)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return dict(value) if isinstance(value, dict) else value


def _uses_grad_scaler(trainer: "L.Trainer") -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None
