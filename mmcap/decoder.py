"""Hugging Face GPT-2 / BERT language models with cross-attention to the image tokens."""
from __future__ import annotations

from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from .config import DecoderConfig
from .tokenizer import CaptionTokenizer

FAMILIES = {"gpt2": (GPT2Config, GPT2LMHeadModel), "bert": (BertConfig, BertLMHeadModel)}


def build_decoder(cfg: DecoderConfig, tokenizer: CaptionTokenizer | None = None, pretrained: bool = True,
                  hf_config: dict | None = None) -> PreTrainedModel:
    """Build the decoder from (in order) a resolved Hugging Face config (`hf_config`, as a saved
    model stores it), pretrained weights, or the size fields. `cfg` is only read.

    `pretrained=False` builds the architecture of `cfg.pretrained` without fetching its weights
    (used when loading a saved captioner, whose weights come from its own safetensors file).
    The resolved config is the returned model's `.config`.
    """
    config_cls, model_cls = FAMILIES[cfg.family]
    if hf_config is not None:
        hf_config = config_cls.from_dict(_decoder_flags(cfg.family, dict(hf_config)))
        model = model_cls(hf_config)
    elif cfg.pretrained and pretrained:
        model = model_cls.from_pretrained(
            cfg.pretrained, trust_remote_code=False, **_decoder_flags(cfg.family, {})
        )
    elif cfg.pretrained:
        hf_config = config_cls.from_pretrained(cfg.pretrained, trust_remote_code=False, **_decoder_flags(cfg.family, {}))
        model = model_cls(hf_config)
    else:
        if tokenizer is None:
            raise ValueError("a decoder built from config needs a tokenizer (for its vocabulary size)")
        model = model_cls(_small_config(cfg, tokenizer))
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def _decoder_flags(family: str, d: dict) -> dict:
    d["add_cross_attention"] = True
    if family == "bert":
        d["is_decoder"] = True
    return d


def _small_config(cfg: DecoderConfig, tok: CaptionTokenizer):
    inner = cfg.intermediate_size or 4 * cfg.hidden_size
    special = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if cfg.family == "gpt2":
        return GPT2Config(
            vocab_size=len(tok), n_positions=cfg.max_positions, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
            n_head=cfg.num_heads, n_inner=inner, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, add_cross_attention=True, **special,
        )
    return BertConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=inner, max_position_embeddings=cfg.max_positions,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        is_decoder=True, add_cross_attention=True, **special,
    )


def decoder_width(model: PreTrainedModel) -> int:
    return model.config.hidden_size
