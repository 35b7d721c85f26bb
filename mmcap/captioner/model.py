"""`Captioner`: ResNet grid -> projection -> language-model decoder (through `mmcap.model.fusion`),
with its preprocessing, decoding and save/load.

A plain `nn.Module` (no Lightning): the training code wraps it, inference needs nothing else. Each
call resolves its `precision` once into an inference plan (`mmcap.accel.plan`) and applies it.
"""
from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from mmcap.captioner.inputs import Images, Prompt, image_sequence, is_one_image, per_image
from mmcap.captioner.results import CaptionResult, Captions, results_of
from mmcap.config import CaptionerConfig
from mmcap.generation import GenerationConfig, GenerationOutput, generate
from mmcap.images import open_image, pixel_steps
from mmcap.model.decoder import build_decoder
from mmcap.model.encoder import ResNetEncoder
from mmcap.model.fusion import OwnCrossAttention, build_fusion
from mmcap.model.lora import apply_train_mode, has_lora, merged_lora
from mmcap.model.projection import GridProjection
from mmcap.model.tokenizer import CaptionTokenizer

if TYPE_CHECKING:  # the plan (and its fast paths) load on the first caption, never for training
    from mmcap.accel.plan import InferencePlan

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class Captioner(nn.Module):
    def __init__(self, cfg: CaptionerConfig, tokenizer: CaptionTokenizer, load_pretrained: bool = True,
                 decoder_config: Optional[dict] = None, generation_config: Optional[GenerationConfig] = None,
                 adapters: bool = True):
        """Prefer `from_config` / `from_pretrained`; `load_pretrained=False` skips hub/torchvision weights.

        `decoder_config` is a resolved Hugging Face decoder config (a saved model's); the
        resolved config of the built decoder is `self.decoder.config`. `cfg` is kept as given.
        `generation_config` holds the model's default decoding options. `adapters=False` builds
        no LoRA adapters (a saved model holds them merged into the weights).
        """
        super().__init__()
        self.config, self.tokenizer = cfg, tokenizer
        self.generation_config = GenerationConfig.coerce(generation_config)
        self.encoder = ResNetEncoder(cfg.encoder, load_weights=load_pretrained, image_size=cfg.image_size)
        self.decoder = build_decoder(cfg.decoder, tokenizer, pretrained=load_pretrained, hf_config=decoder_config)
        self.fusion = build_fusion(cfg.decoder, self.decoder)
        if adapters:
            apply_train_mode(self.decoder, cfg.decoder)
        grid = -(-cfg.image_size // self.encoder.stride)
        self.projection = GridProjection(cfg.projection, self.encoder.out_channels, self.decoder.config.hidden_size,
                                         max_grid=cfg.projection.max_grid or grid)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg, tokenizer: Optional[CaptionTokenizer] = None,
                    captions: Optional[Iterable[str]] = None,
                    generation_config: Optional[GenerationConfig] = None) -> "Captioner":
        """A new model from a config (a `CaptionerConfig`, a dict, or a JSON/YAML preset such as
        `configs/model/demo_gpt2.yaml`).

        The tokenizer is, in order: the one passed in, the pretrained decoder's own, or one
        trained from `captions`.
        """
        if isinstance(cfg, (str, Path)):
            cfg = CaptionerConfig.load(cfg)
        elif isinstance(cfg, dict):
            cfg = CaptionerConfig.from_dict(cfg)
        if tokenizer is None:
            if cfg.decoder.pretrained:
                tokenizer = CaptionTokenizer.load(cfg.decoder.pretrained)
            elif captions is not None:
                tokenizer = CaptionTokenizer.train(captions, cfg.tokenizer)
            else:
                raise ValueError("a decoder built from config needs `tokenizer=` or `captions=` to train one")
        return cls(cfg, tokenizer, generation_config=generation_config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        revision: Optional[str] = None) -> "Captioner":
        """Load a `save_pretrained` directory, or a Hugging Face Hub repo id (`org/name`, at `revision`;
        only the model files are downloaded, and HF_HUB_OFFLINE=1 reads the Hub cache only).
        Reads only JSON, safetensors and tokenizer files."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from mmcap.model.hub import model_dir

        path = model_dir(path, revision)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing: not a mmcap model directory")
        try:
            saved = json.loads((path / CONFIG_FILE).read_text())
            cfg = CaptionerConfig.from_dict(saved)
            decoder_config = saved_decoder_config(saved)
        except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path / CONFIG_FILE} is not a valid mmcap config: {e}") from None
        generation_config = GenerationConfig.load(path)
        try:
            tokenizer = CaptionTokenizer.load(path)
        except Exception as e:
            raise ValueError(f"{path}: cannot load the tokenizer files: {e}") from None
        model = cls(cfg, tokenizer, load_pretrained=False, decoder_config=decoder_config,
                    generation_config=generation_config, adapters=False)
        try:
            missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False, device=str(map_location))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path / WEIGHTS_FILE} is corrupt or does not fit the config: {e}") from None
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_FILE} does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config, generation defaults, weights and tokenizer; each file appears only when complete.

        `config.json` is `self.config` plus, beside it, `mmcap_version` and `resolved.decoder`
        (the decoder's full Hugging Face config, so that loading never needs the hub).
        """
        from safetensors.torch import save_model

        if has_lora(self.decoder):  # exporting merges LoRA: the saved model needs no peft
            return merged_lora(self).save_pretrained(path)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        saved = {"mmcap_version": _version(), **self.config.to_dict(),
                 "resolved": {"decoder": self.decoder.config.to_dict()}}
        with tempfile.TemporaryDirectory(dir=path, prefix=".tmp-") as tmp:
            tmp = Path(tmp)
            self.tokenizer.save(tmp)
            self.generation_config.save(tmp)
            save_model(self, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(saved, indent=2))
            # weights and tokenizer first, config last: a directory with config.json is complete
            names = sorted(p.name for p in tmp.iterdir() if p.name != CONFIG_FILE) + [CONFIG_FILE]
            for name in names:
                os.replace(tmp / name, path / name)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the `save_pretrained` files and a generated model card (README.md) to the Hub;
        `revision`, `private`, `token`, `commit_message`, and `datasets` and `metrics` for the card
        (see `mmcap.model.hub.push`). Returns the commit URL."""
        from mmcap.model.hub import push

        return push(self, repo_id, **kwargs)

    # ----------------------------------------------------------------- model
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, H*W, D] for normalised pixels [B, 3, S, S]."""
        return self.project(self.encoder(pixels))

    def project(self, grid: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, H*W, D] for encoder grids [B, C, H, W] (e.g. precomputed `mmcap.training.features`)."""
        return self.projection(grid)

    def grid_shape(self, pixels: torch.Tensor) -> tuple[int, int]:
        h, w = pixels.shape[-2:]
        s = self.encoder.stride
        return -(-h // s), -(-w // s)

    def token_log_probs(self, memory: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log P(w_n | image, w_<n) of each target token [B, T-1]; 0 at padding, and with `labels`
        (as in `forward`) 0 wherever they hold -100 (a prompt's own tokens)."""
        logits = self.fusion.logits(self.decoder, memory, input_ids[:, :-1], attention_mask[:, :-1]).float()
        logp = F.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
        return logp * (attention_mask[:, 1:] if labels is None else labels[:, 1:] != -100)

    def forward(self, pixels: Optional[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                label_smoothing: float = 0.0, memory: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced cross-entropy per target token, padding ignored. `memory` (image tokens
        from `encode` or `project`) replaces `pixels` when given. `labels` [B, T], aligned with
        `input_ids` as the tokenizer makes them, hold -100 where nothing is trained (BOS, a prompt,
        padding); without them every token after BOS but padding is a target."""
        if memory is None:
            memory = self.encode(pixels)
        logits = self.fusion.logits(self.decoder, memory, input_ids[:, :-1], attention_mask[:, :-1])
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels = labels[:, 1:]
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
            label_smoothing=label_smoothing,
        )

    def generate(self, pixels: Optional[torch.Tensor], output_attentions: bool = False,
                 precision: Union[str, "InferencePlan"] = "fp32", memory: Optional[torch.Tensor] = None,
                 prompt: Prompt = None, **generation_kwargs) -> GenerationOutput:
        """Decode normalised pixels [B,3,S,S] (or image tokens `memory`); `precision` (or a plan
        resolved from one), `prompt` and the generation options as in `caption`. The sequences are
        the continuations of the prompts."""
        from mmcap.accel.plan import as_plan

        cfg = self.generation_options(**generation_kwargs)
        plan = as_plan(precision, self.device)
        n = len(memory) if memory is not None else len(pixels)
        prompts = [self.tokenizer.prompt_ids(p) for p in per_image(prompt, n)] if prompt is not None else None
        self._check_positions(prompts, cfg.max_new_tokens)
        plan.prepare()
        tok = self.tokenizer
        with plan.computing():
            if memory is None:
                memory = plan.project(self.projection, plan.encode(self.encoder, pixels))
            with plan.decoding(self.decoder, memory) as memory:
                return generate(self.decoder, memory, tok.bos_id, tok.eos_id, tok.pad_id, cfg, output_attentions,
                                fusion=self.fusion, prompts=prompts, attention=plan.attention)

    def _check_positions(self, prompts: Optional[list[list[int]]], max_new_tokens: int) -> None:
        """A clear error where BOS, a prompt and `max_new_tokens` need more positions than GPT-2's
        or BERT's position table holds (it would fail as an index error deep in the decoder)."""
        limit = getattr(self.decoder.config, "max_position_embeddings", None)
        if not isinstance(self.fusion, OwnCrossAttention) or limit is None:  # a prefix takes positions too
            return
        lengths = [len(p) for p in prompts] if prompts else [0]
        i = max(range(len(lengths)), key=lengths.__getitem__)
        if 1 + lengths[i] + max_new_tokens > limit:
            what = f"image {i}'s prompt of {lengths[i]} tokens, " if prompts else ""
            raise ValueError(f"BOS, {what}and max_new_tokens={max_new_tokens} need {1 + lengths[i] + max_new_tokens} "
                             f"positions; the decoder has {limit}: shorten the prompt or lower max_new_tokens")

    def generation_options(self, **overrides) -> GenerationConfig:
        """This model's generation defaults with a call's `overrides`, max_new_tokens resolved."""
        return self.generation_config.updated(**overrides).resolved(self.config.max_caption_tokens)

    # ----------------------------------------------------------------- public API
    def preprocess(self, images: Images, draft: bool = False, first_index: int = 0) -> tuple[torch.Tensor, list[str]]:
        """Pixels [B,3,S,S] and a name per image; a tensor batch is taken as already normalised.

        `draft=True` lets large JPEGs decode at a reduced scale (never below the model's image size).
        Images without a file name are named `image N`, N counted from `first_index`.
        """
        if isinstance(images, torch.Tensor):
            batch = images if images.dim() == 4 else images[None]
            return batch.float(), [f"image {i}" for i in range(len(batch))]
        items = list(image_sequence(images))
        size = self.config.image_size
        # uint8 pixels per image, then floats for the whole batch at once: eval_transform's numbers
        to_pixels, to_input = pixel_steps(size)
        names = [str(x) if isinstance(x, (str, os.PathLike)) else f"image {i}"
                 for i, x in enumerate(items, first_index)]
        def load(x, name):
            return to_pixels(open_image(x, name, min_size=size) if draft else open_image(x, name))

        if len(items) < 2 or torch.get_num_threads() < 2:
            return to_input(torch.stack([load(x, name) for x, name in zip(items, names)])), names
        # JPEG decoding and resizing release the GIL: one image per core at a time (in order;
        # the first bad image raises, as one by one)
        with ThreadPoolExecutor(min(len(items), torch.get_num_threads())) as pool:
            return to_input(torch.stack(list(pool.map(load, items, names)))), names

    @torch.no_grad()
    def caption(self, images: Images, batch_size: int = 16, return_scores: bool = False,
                return_attention: bool = False, precision: Union[str, "InferencePlan"] = "fp32",
                prompt: Prompt = None, **generation_kwargs):
        """Captions for paths, PIL images or a tensor batch; one image in, one `str` out.

        `prompt` (a `str` for every image, or a list with one per image) is text the caption
        continues: the model predicts P(w_n | image, prompt, w_<n), and the captions returned are
        the continuations, without the prompt. None (the default) starts from BOS alone.

        `return_scores=True` returns `(captions, log_probs)`; `return_attention=True` adds, per
        caption, the cross-attention per generated token shaped (tokens, H, W), mean over heads
        and layers; such a tuple is a `Captions`, whose `.words` holds each caption's generated words,
        one per attention map. Generation options follow transformers (`num_beams`, `max_new_tokens`, ...);
        those not given come from `self.generation_config` (a saved model's generation_config.json).

        `precision="fp32"` computes what the reference fp32 pipeline computes. `"bf16"` runs the
        encoder and decoder in bfloat16 (autocast) and lets large JPEGs decode at reduced scale:
        about twice as fast where the hardware has bf16 matmuls, with slightly different captions.
        `"auto"` is bf16 where it measured faster than fp32 on this machine (`mmcap.accel.precision`),
        else fp32. `"int8"` is `"auto"` with the decoder's linear layers and LM head computing in
        int8 on CPUs (`mmcap.accel.quantize`): lossy, so never chosen by `auto`; on GPUs it is `auto`.
        `mmcap caption --precision` means the same.
        """
        results = self.caption_details(images, batch_size, return_attention, precision, prompt=prompt,
                                       **generation_kwargs)
        return Captions.of(results, is_one_image(images), return_scores, return_attention)

    @torch.no_grad()
    def caption_details(self, images: Images, batch_size: int = 16, return_attention: bool = False,
                        precision: Union[str, "InferencePlan"] = "fp32", prompt: Prompt = None,
                        **generation_kwargs) -> list[CaptionResult]:
        """A `CaptionResult` per image: caption, log-prob, words, attention maps (when asked) and,
        with beam search, the other finished captions. Arguments as in `caption`, which is this
        result in its familiar shape."""
        from mmcap.accel.plan import as_plan

        generation_kwargs = self.generation_options(**generation_kwargs).to_dict()
        plan = as_plan(precision, self.device)
        was_training = self.training
        self.eval()
        results: list[CaptionResult] = []
        seq = image_sequence(images)
        prompts = per_image(prompt, len(seq))
        try:
            with plan.computing():  # one context for all batches: weights are cast once
                for start in range(0, len(seq), batch_size):
                    pixels, _ = self.preprocess(seq[start : start + batch_size], draft=plan.draft, first_index=start)
                    pixels = pixels.to(self.device)
                    out = self.generate(pixels, output_attentions=return_attention, precision=plan,
                                        prompt=prompts[start : start + batch_size], **generation_kwargs)
                    results += results_of(out, self.tokenizer, self.grid_shape(pixels) if return_attention else None)
        finally:
            self.train(was_training)
        return results

    def caption_stream(self, inputs, **kwargs):
        """Results of captioning image files, folders and webdataset shards, streamed with flat
        memory (decoding in `num_workers` DataLoader workers): an iterable of dicts `{"image",
        "caption", "log_prob"}` (plus `"shard"`; `"error"` for an unusable image). Captions equal
        `caption`'s for the same images and options (`prompt=` one text for every image). See
        `mmcap.captioner.stream.CaptionStream`."""
        from mmcap.captioner.stream import CaptionStream

        return CaptionStream(self, inputs, **kwargs)

    @torch.no_grad()
    def score(self, images: Images, captions: Union[str, Sequence[str]], batch_size: int = 16,
              prompt: Prompt = None) -> torch.Tensor:
        """Log-likelihood (sum of token log-probs, EOS included) of each caption given its image
        (and `prompt`, as in `caption`; its own tokens are not counted)."""
        single = isinstance(captions, str)
        captions = [captions] if single else list(captions)
        seq = image_sequence(images)
        if len(seq) != len(captions):
            raise ValueError(f"score() got {len(seq)} images but {len(captions)} captions")
        prompts = per_image(prompt, len(captions))
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(captions), batch_size):
                pixels, _ = self.preprocess(seq[start : start + batch_size], first_index=start)
                batch = self.tokenizer(captions[start : start + batch_size], self.config.max_caption_tokens,
                                       prompts[start : start + batch_size])
                memory = self.encode(pixels.to(self.device))
                logp = self.token_log_probs(memory, **{k: v.to(self.device) for k, v in batch.items()})
                out.append(logp.sum(1).cpu())
        finally:
            self.train(was_training)
        result = torch.cat(out)
        return result[0] if single else result


def saved_decoder_config(saved: dict) -> Optional[dict]:
    """The resolved decoder config of a saved `config.json`: `resolved.decoder` (0.2 on) or
    `decoder.hf_config` (0.1)."""
    resolved = (saved.get("resolved") or {}).get("decoder")
    return resolved if resolved is not None else (saved.get("decoder") or {}).get("hf_config")


def _version() -> str:
    from mmcap import __version__

    return __version__
