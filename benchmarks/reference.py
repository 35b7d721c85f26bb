"""The reference pipelines that the benchmarks and tests/generation/test_perf_equivalence.py hold
mmcap to: `NaivePipeline` (mmcap's weights run the obvious way), `VitGpt2Pipeline` (transformers'
ViT + GPT-2 of the same size class) and `TransformersForward` (mmcap's decoding via the generic path)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from PIL import Image

from mmcap import Captioner
from mmcap.images import eval_transform
from mmcap.model.tokenizer import CaptionTokenizer

from models import BATCH_SIZE, GENERATION, VOCAB

class NaivePipeline:
    """An mmcap GPT-2 captioner's architecture and weights, written the obvious way in fp32: PIL +
    torchvision transforms, a torchvision ResNet grid (no pooling), the projection's Linear,
    LayerNorm and position table, then `GPT2LMHeadModel.generate(encoder_hidden_states=...)`."""

    def __init__(self, model: Captioner, device: str | torch.device = "cpu"):
        import torchvision
        from transformers import GPT2LMHeadModel

        if model.config.projection.kind != "linear":
            raise ValueError(f"the naive pipeline has a linear projection, not {model.config.projection.kind!r}")
        resnet = torchvision.models.get_model(model.config.encoder.arch)
        missing, unexpected = resnet.load_state_dict(model.encoder.torchvision_state_dict(), strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected, (missing, unexpected)
        self.backbone = torch.nn.Sequential(*list(resnet.children())[:-2]).eval()
        proj = model.projection
        self.linear, self.norm = copy.deepcopy(proj.proj), copy.deepcopy(proj.norm)
        self.row_embed, self.col_embed = proj.row_embed.detach().clone(), proj.col_embed.detach().clone()
        self.gpt2 = GPT2LMHeadModel(model.decoder.config).eval()
        self.gpt2.load_state_dict(model.decoder.state_dict())
        self.transform = eval_transform(model.config.image_size)  # the same pixels as mmcap's fp32 path
        self.tokenizer = model.tokenizer
        self.device = torch.device(device)
        for module in (self.backbone, self.linear, self.norm, self.gpt2):
            module.to(self.device)
        self.row_embed, self.col_embed = self.row_embed.to(self.device), self.col_embed.to(self.device)

    @torch.no_grad()
    def memory(self, paths: Sequence) -> torch.Tensor:
        """Image tokens [B, H*W, width] of image files."""
        pixels = torch.stack([self.transform(Image.open(p).convert("RGB")) for p in paths]).to(self.device)
        grid = self.backbone(pixels)  # [B, C, H, W]
        _, _, h, w = grid.shape
        memory = self.norm(self.linear(grid.flatten(2).transpose(1, 2)))
        return memory + (self.row_embed[:h, None] + self.col_embed[None, :w]).reshape(h * w, -1)

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, **generation_kwargs) -> torch.Tensor:
        """transformers' greedy or beam search from BOS; ids [B, 1 + new tokens]."""
        tok, b = self.tokenizer, memory.shape[0]
        return self.gpt2.generate(
            input_ids=torch.full((b, 1), tok.bos_id, device=memory.device),
            attention_mask=torch.ones(b, 1, dtype=torch.long, device=memory.device),
            encoder_hidden_states=memory, do_sample=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id, **generation_kwargs,
        )

    def caption(self, paths: Sequence, batch_size: int = BATCH_SIZE, **generation_kwargs) -> list[str]:
        out = []
        for start in range(0, len(paths), batch_size):
            ids = self.generate(self.memory(paths[start : start + batch_size]), **generation_kwargs)
            out += [self.tokenizer.hf.decode(row[1:], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False).strip() for row in ids]
        return out


class VitGpt2Pipeline:
    """transformers' VisionEncoderDecoderModel: ViT-B/16 + GPT-2 small, random init, fp32, with
    `ViTImageProcessor` and `generate`: the shape of the most downloaded captioning checkpoint."""

    def __init__(self, tokenizer: CaptionTokenizer, device: str | torch.device = "cpu"):
        from transformers import (GPT2Config, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                                  VisionEncoderDecoderModel)

        torch.manual_seed(1)
        special = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        decoder = GPT2Config(vocab_size=VOCAB, add_cross_attention=True, is_decoder=True, **special)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), decoder)
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id
        self.device = torch.device(device)
        self.model = VisionEncoderDecoderModel(config=cfg).eval().to(self.device)
        self.processor = ViTImageProcessor()
        self.tokenizer = tokenizer.hf

    @torch.no_grad()
    def caption(self, paths, batch_size: int) -> list[str]:
        out = []
        for start in range(0, len(paths), batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
            pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device)
            ids = self.model.generate(pixels, do_sample=False, **GENERATION)
            out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return out


class TransformersForward(torch.nn.Module):
    """`decoder` behind a plain module. `mmcap.generation.decode.generate` takes its lean path only for a
    `GPT2LMHeadModel` itself and decodes any other model through its transformers forward (with
    the caches): wrapping the same decoder gives that generic path, same weights and math."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder
        self.config = decoder.config

    def forward(self, **kwargs):
        return self.decoder(**kwargs)
