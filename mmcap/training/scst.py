"""Self-critical sequence training (Rennie et al., 2017): optimise CIDEr-D directly.

For each image, K captions are sampled from the model; each earns its CIDEr-D against the
references, minus a baseline (the greedy caption's reward, or the mean reward of the image's
other samples); the loss is -(reward - baseline) * log p(sample). Sampling runs without
gradients through the cached decoder; the log-probabilities are recomputed with teacher forcing
so the gradient flows through one ordinary forward pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, Sequence

import torch

from mmcap.generation.decode import generate
from mmcap.generation.config import GenerationConfig
from mmcap.metrics.cider import CiderD
from mmcap.metrics.ptb import ptb_tokenize


def _default_sampling() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=20, do_sample=True, top_k=0)


@dataclass
class SCSTConfig:
    num_samples: int = 5
    baseline: Literal["greedy", "mean"] = "mean"
    # How the K captions per image are drawn (a `GenerationConfig`; do_sample is always on, and
    # the greedy baseline decodes greedily to the same max_new_tokens).
    sampling: GenerationConfig = field(default_factory=_default_sampling)

    def __post_init__(self) -> None:
        self.sampling = dataclasses.replace(GenerationConfig.coerce(self.sampling), do_sample=True, num_beams=1)
        if self.sampling.max_new_tokens is None:
            self.sampling = dataclasses.replace(self.sampling, max_new_tokens=20)
        if self.baseline not in ("greedy", "mean"):
            raise ValueError(f"scst baseline must be 'greedy' or 'mean', got {self.baseline!r}")
        if self.baseline == "mean" and self.num_samples < 2:
            raise ValueError("the 'mean' baseline needs num_samples >= 2")


def reward_scorer(corpus_references: Iterable[Sequence[str]]) -> CiderD:
    """CIDEr-D with document frequencies from the training references (one list per image)."""
    return CiderD([ptb_tokenize(r) for r in refs] for refs in corpus_references)


def cider_rewards(scorer: CiderD, captions: Sequence[str], references: Sequence[Sequence[str]]) -> torch.Tensor:
    """CIDEr-D of each caption against its references, tokenised as the metrics are."""
    cands = [ptb_tokenize(c) for c in captions]
    refs = [[ptb_tokenize(r) for r in rs] for rs in references]
    return torch.as_tensor(scorer.score(cands, refs), dtype=torch.float32)


def self_critical_loss(model, pixels: Optional[torch.Tensor], references: Sequence[Sequence[str]], scorer: CiderD,
                       cfg: SCSTConfig, memory: Optional[torch.Tensor] = None,
                       prompts: Optional[Sequence[Optional[str]]] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """SCST loss for one batch of images (or their image tokens `memory`) and their reference captions.
    `prompts` (per image, text or None): each image's captions continue its prompt, as `caption`'s
    do; the reward is the continuation's, and the prompt's own tokens carry no gradient."""
    tok, k = model.tokenizer, cfg.num_samples
    if memory is None:
        memory = model.encode(pixels)
    prompt_ids = [tok.prompt_ids(p) for p in (prompts if prompts is not None else [None] * len(references))]
    prompt_ids_k = [ids for ids in prompt_ids for _ in range(k)]
    sampling = cfg.sampling
    was_training = model.training
    model.eval()  # no dropout while sampling, as at test time
    with torch.no_grad():
        samples = generate(model.decoder, memory.detach().repeat_interleave(k, 0), tok.bos_id, tok.eos_id,
                           tok.pad_id, sampling, fusion=model.fusion, prompts=prompt_ids_k)
        greedy = None
        if cfg.baseline == "greedy":
            greedy = generate(model.decoder, memory.detach(), tok.bos_id, tok.eos_id, tok.pad_id,
                              GenerationConfig(max_new_tokens=sampling.max_new_tokens), fusion=model.fusion,
                              prompts=prompt_ids)
    model.train(was_training)

    refs_k = [r for r in references for _ in range(k)]
    texts = [tok.decode(samples.sequences[i, : samples.lengths[i]]) for i in range(len(refs_k))]
    rewards = cider_rewards(scorer, texts, refs_k).view(-1, k)
    if greedy is not None:
        greedy_texts = [tok.decode(greedy.sequences[i, : greedy.lengths[i]]) for i in range(len(references))]
        baseline = cider_rewards(scorer, greedy_texts, references)[:, None].expand(-1, k)
    else:
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    advantage = (rewards - baseline).view(-1).to(memory.device)

    # teacher-forced log p(sample | image, prompt), with gradients: `BOS prompt sample`, the sample's tokens counted
    ids, mask, labels = _sample_tokens(tok, prompt_ids_k, samples.sequences, samples.lengths)
    log_probs = model.token_log_probs(memory.repeat_interleave(k, 0), ids.to(memory.device), mask.to(memory.device),
                                      labels.to(memory.device)).sum(1)
    loss = -(advantage * log_probs).mean()
    stats = {"reward": rewards.mean().item(), "baseline": baseline.mean().item(),
             "advantage_abs": advantage.abs().mean().item()}
    return loss, stats


def _sample_tokens(tok, prompt_ids: Sequence[Sequence[int]], sequences: torch.Tensor,
                   lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels [N, T] of `BOS prompt sample` per row, right-padded;
    labels -100 at BOS, the prompt and padding."""
    rows = [[tok.bos_id, *p, *sequences[i, : int(lengths[i])].tolist()] for i, p in enumerate(prompt_ids)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompt_ids)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, 1 + len(p) : len(row)] = ids[i, 1 + len(p) : len(row)]
    return ids, mask, labels
