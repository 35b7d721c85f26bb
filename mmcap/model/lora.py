"""What trains in the decoder (`decoder.train`): everything, LoRA adapters (peft), or nothing of the
LM's own weights. The projection and the fusion blocks always train; so do GPT-2's/BERT's own
cross-attention layers, which are new to a pretrained LM just as inserted blocks are.

LoRA adapters are injected in place (`peft.inject_adapter_in_model`), so the LM keeps its module
tree; `merged_lora` folds them into the weights for export, after which peft is not needed.
"""
from __future__ import annotations

import copy

from torch import nn

from mmcap.config import DecoderConfig

# The attention and MLP projections LoRA adapts, by family; others fall back to peft's own table.
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc", "q_attn"],
    "bert": ["query", "key", "value", "dense"],
}
# Names of the LM's own cross-attention parameters (GPT-2, BERT): they train in every mode.
OWN_CROSS_ATTENTION = ("crossattention", "ln_cross_attn")


def apply_train_mode(lm: nn.Module, cfg: DecoderConfig) -> None:
    """Set which of the LM's parameters train (injecting LoRA adapters for `lora`)."""
    if cfg.train == "full":
        return
    if cfg.train == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ImportError("decoder.train: lora needs peft: pip install 'mmcap[lora]'") from None
        targets = cfg.lora_targets or lora_targets(lm.config.model_type)
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets), lm)
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name or any(part in name for part in OWN_CROSS_ATTENTION))


def lora_targets(model_type: str) -> list[str]:
    if model_type in LORA_TARGETS:
        return LORA_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    if model_type not in PEFT_TARGETS:
        raise ValueError(f"no default LoRA targets for {model_type!r}: set decoder.lora_targets")
    return list(PEFT_TARGETS[model_type])


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def merged_lora(module: nn.Module) -> nn.Module:
    """A copy of `module` with every LoRA adapter merged into its base layer and removed."""
    from peft.tuners.lora import LoraLayer

    module = copy.deepcopy(module)
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    return module


def frozen_lm_weights(lm: nn.Module) -> set[str]:
    """State-dict names of the LM's frozen parameters (tied ones under each of their names)."""
    return {name for name, t in lm.state_dict(keep_vars=True).items() if isinstance(t, nn.Parameter) and not t.requires_grad}


def load_base_weights(lm: nn.Module, path: str) -> None:
    """The weights of the checkpoint `path` into `lm`, whose adapted layers keep them under `base_layer`
    (training checkpoints of `lora`/`frozen` models leave the LM's frozen weights out)."""
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(path, config=lm.config, trust_remote_code=False).state_dict()
    names = {name.replace(".base_layer.", "."): name for name in lm.state_dict()}
    unknown = sorted(set(source) - set(names))
    if unknown:
        raise ValueError(f"{path} does not fit the decoder: unexpected {unknown[:5]}")
    lm.load_state_dict({names[k]: v for k, v in source.items()}, strict=False)
