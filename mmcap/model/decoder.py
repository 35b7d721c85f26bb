"""Hugging Face causal language models as the caption decoder: GPT-2 and BERT with their own
cross-attention to the image tokens, or any `AutoModelForCausalLM` family (Llama, Qwen2, GPT-NeoX,
...) that reads the image through `mmcap.model.fusion`. Never runs code from a checkpoint."""
from __future__ import annotations


from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, BertConfig, GPT2Config, PretrainedConfig, PreTrainedModel

from mmcap.config import DecoderConfig, causal_lm_types
from mmcap.model.tokenizer import CaptionTokenizer

# Families with their own cross-attention layers: the config flags that switch them on (BERT also
# needs `is_decoder` to be causal at all). Every other family reads the image through mmcap.model.fusion.
CROSS_ATTENTION_FLAGS = {"gpt2": {"add_cross_attention": True}, "bert": {"add_cross_attention": True}}
ALWAYS_FLAGS = {"bert": {"is_decoder": True}}
# Config attributes that set dropout, by whatever name a family's config has them.
DROPOUT_NAMES = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


def build_decoder(cfg: DecoderConfig, tokenizer: CaptionTokenizer | None = None, pretrained: bool = True,
                  hf_config: dict | None = None) -> PreTrainedModel:
    """Build the decoder from (in order) a resolved Hugging Face config (`hf_config`, as a saved
    model stores it), pretrained weights, or the size fields. `cfg` is only read.

    `pretrained=False` builds the architecture of `cfg.pretrained` without fetching its weights
    (used when loading a saved captioner, whose weights come from its own safetensors file).
    The resolved config is the returned model's `.config`.
    """
    if hf_config is not None:
        model_type = hf_config.get("model_type", cfg.family)
        config = CONFIG_MAPPING[model_type].from_dict(_flags(model_type, cfg, dict(hf_config)))
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    elif cfg.pretrained:
        config = checkpoint_config(cfg.pretrained)
        for name, value in _flags(config.model_type, cfg, {}).items():
            setattr(config, name, value)
        if pretrained:
            model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, config=config, trust_remote_code=False)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    else:
        if tokenizer is None:
            raise ValueError("a decoder built from config needs a tokenizer (for its vocabulary size)")
        model = AutoModelForCausalLM.from_config(_small_config(cfg, tokenizer), trust_remote_code=False)
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def checkpoint_config(path: str) -> PretrainedConfig:
    """The Hugging Face config of a causal LM checkpoint (hub id or directory); a clear error for
    one whose architecture needs the checkpoint's own code, which mmcap never runs."""
    d, _ = PretrainedConfig.get_config_dict(path)
    model_type = d.get("model_type")
    if model_type not in causal_lm_types():
        arch = ", ".join(d.get("architectures") or []) or "unknown"
        why = ("needs custom code from the checkpoint (trust_remote_code), which mmcap never runs"
               if d.get("auto_map") else f"is not a causal language model transformers knows (model_type {model_type!r})")
        raise ValueError(f"decoder.pretrained {path}: architecture {arch} {why}")
    return AutoConfig.from_pretrained(path, trust_remote_code=False)


def uses_own_cross_attention(model_type: str, cfg: DecoderConfig) -> bool:
    """GPT-2 and BERT read the image through their own cross-attention layers."""
    return cfg.fusion == "cross_attention" and model_type in CROSS_ATTENTION_FLAGS


def _flags(model_type: str, cfg: DecoderConfig, d: dict) -> dict:
    d.update(ALWAYS_FLAGS.get(model_type, {}))
    if uses_own_cross_attention(model_type, cfg):
        d.update(CROSS_ATTENTION_FLAGS[model_type])
    return d


def _small_config(cfg: DecoderConfig, tok: CaptionTokenizer) -> PretrainedConfig:
    inner = cfg.intermediate_size or 4 * cfg.hidden_size
    special = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if cfg.family == "gpt2":
        return GPT2Config(
            vocab_size=len(tok), n_positions=cfg.max_positions, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
            n_head=cfg.num_heads, n_inner=inner, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, **_flags("gpt2", cfg, {}), **special,
        )
    if cfg.family == "bert":
        return BertConfig(
            vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=inner, max_position_embeddings=cfg.max_positions,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, **_flags("bert", cfg, {}),
            **special,
        )
    config = AutoConfig.for_model(
        cfg.family, vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=inner, max_position_embeddings=cfg.max_positions,
        **special,
    )
    # sizes some families keep apart (grouped-query heads, Gemma's wide heads): plain multi-head here
    derived = {"num_key_value_heads": cfg.num_heads, "head_dim": cfg.hidden_size // cfg.num_heads}
    derived.update((name, cfg.dropout) for name in DROPOUT_NAMES if isinstance(getattr(config, name, None), float))
    for name, value in derived.items():
        if getattr(config, name, None) is not None:
            setattr(config, name, value)
    return config


def decoder_width(model: PreTrainedModel) -> int:
    return model.config.hidden_size
