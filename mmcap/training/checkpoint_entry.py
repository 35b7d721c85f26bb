"""The model entry of a CaptionModule checkpoint: everything besides the weights that rebuilds
the `Captioner` offline (config, resolved decoder config, generation defaults, tokenizer files),
as plain types, so checkpoints load with `torch.load(weights_only=True)`. With a frozen or LoRA
pretrained LM, the LM's own weights stay out of the checkpoint and come from `decoder.pretrained`.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from mmcap.captioner.model import Captioner, saved_decoder_config
from mmcap.config import CaptionerConfig
from mmcap.model.lora import frozen_lm_weights, load_base_weights
from mmcap.model.tokenizer import CaptionTokenizer

CHECKPOINT_KEY = "mmcap"  # checkpoint entry with the model config and tokenizer files (plain types)


def checkpoint_entry(captioner: Captioner) -> dict[str, Any]:
    """What a checkpoint needs besides the weights to rebuild `captioner` offline (plain types)."""
    return {
        "config": captioner.config.to_dict(),
        "decoder_config": captioner.decoder.config.to_dict(),  # resolved: loading never needs the hub
        "generation": captioner.generation_config.to_dict(),
        "tokenizer": captioner.tokenizer.to_files(),
        # where the LM's frozen weights come from: the checkpoint itself, or decoder.pretrained
        "lm_weights": lm_weights_source(captioner),
    }


def lm_weights_source(captioner: Captioner) -> str:
    decoder = captioner.config.decoder
    return "pretrained" if decoder.pretrained and decoder.train != "full" else "checkpoint"


def captioner_from_entry(checkpoint: dict[str, Any]) -> Captioner:
    """An (untrained) `Captioner` shaped as a checkpoint's model; 0.1 checkpoints included."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        raise ValueError("this checkpoint was not written by mmcap's CaptionModule: it has no model config/tokenizer")
    decoder_config = saved.get("decoder_config") or saved_decoder_config(saved["config"])
    captioner = Captioner(CaptionerConfig.from_dict(saved["config"]), CaptionTokenizer.from_files(saved["tokenizer"]),
                          load_pretrained=False, decoder_config=decoder_config,
                          generation_config=saved.get("generation"))
    if saved.get("lm_weights") == "pretrained":
        load_base_weights(captioner.decoder, captioner.config.decoder.pretrained)
    return captioner


def with_frozen_lm_weights(captioner: Captioner, state: dict, prefix: str = "") -> dict:
    """`state` (keys under `prefix`) completed with the LM weights a checkpoint left out because they
    reload from decoder.pretrained (`captioner` already holds them); unchanged otherwise."""
    if lm_weights_source(captioner) != "pretrained":
        return state
    lm = captioner.decoder.state_dict()
    return {**{f"{prefix}decoder.{n}": lm[n] for n in frozen_lm_weights(captioner.decoder)}, **state}


def captioner_from_checkpoint(path: str):
    """The `Captioner` of a CaptionModule checkpoint, read with `torch.load(weights_only=True)`.

    Built from the checkpoint's model entry and weights alone (the module's own options are not
    needed), so checkpoints of older mmcap versions export too."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    captioner = captioner_from_entry(checkpoint)
    prefix = "captioner."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    captioner.load_state_dict(with_frozen_lm_weights(captioner, state))
    return captioner.eval()
