"""benchmarks/bench_fusion.py's parameter counts, against a hand count of LoRA's adapters."""
from helpers import CAPTIONS, tiny_config

from mmcap import Captioner

from bench_fusion import parameter_counts  # benchmarks/, on pytest's `pythonpath`


def test_parameter_counts_of_a_lora_llama_by_hand():
    decoder = {**tiny_config()["decoder"], "family": "llama", "fusion": "prefix"}  # width 32, 2 layers, MLP 128
    full = Captioner.from_config(tiny_config(decoder=decoder), captions=CAPTIONS)
    lora = Captioner.from_config(tiny_config(decoder={**decoder, "train": "lora", "lora_rank": 2}), captions=CAPTIONS)
    # rank 2 adapters, A [2, in] and B [out, 2], on q/k/v/o (32 -> 32), gate/up (32 -> 128) and down (128 -> 32)
    adapters = 2 * (4 * (2 * 32 + 32 * 2) + 2 * (2 * 32 + 128 * 2) + (2 * 128 + 32 * 2))
    lm = sum(p.numel() for p in full.decoder.parameters())
    trainable, total = parameter_counts(full)
    assert trainable == total == sum(p.numel() for p in full.parameters())
    assert parameter_counts(lora) == (total - lm + adapters, total + adapters)  # the LM's own weights frozen
