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

from .generation import generate
from .generation_config import GenerationConfig
from .metrics.cider import CiderD
from .metrics.ptb import ptb_tokenize


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
                       cfg: SCSTConfig, memory: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """SCST loss for one batch of images (or their image tokens `memory`) and their reference captions."""
    tok, k = model.tokenizer, cfg.num_samples
    if memory is None:
        memory = model.encode(pixels)
    sampling = cfg.sampling
    was_training = model.training
    model.eval()  # no dropout while sampling, as at test time
    with torch.no_grad():
        samples = generate(model.decoder, memory.detach().repeat_interleave(k, 0), tok.bos_id, tok.eos_id,
                           tok.pad_id, sampling)
        greedy = None
        if cfg.baseline == "greedy":
            greedy = generate(model.decoder, memory.detach(), tok.bos_id, tok.eos_id, tok.pad_id,
                              GenerationConfig(max_new_tokens=sampling.max_new_tokens))
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

    # teacher-forced log p(sample | image), with gradients
    ids = torch.cat([torch.full((len(refs_k), 1), tok.bos_id, device=memory.device), samples.sequences], 1)
    mask = (torch.arange(ids.shape[1], device=ids.device)[None] <= samples.lengths[:, None]).long()
    log_probs = model.token_log_probs(memory.repeat_interleave(k, 0), ids, mask).sum(1)
    loss = -(advantage * log_probs).mean()
    stats = {"reward": rewards.mean().item(), "baseline": baseline.mean().item(),
             "advantage_abs": advantage.abs().mean().item()}
    return loss, stats
