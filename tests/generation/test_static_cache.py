"""The static self-attention cache (`mmcap.generation.static_cache`) decodes what the dynamic
one does, in buffers that keep their shapes and addresses from step to step."""
import pytest
import torch

from mmcap.generation import GenerationConfig, generate
from mmcap.generation.gpt2_pass import GPT2Decoding
from mmcap.generation.static_cache import StaticAttention, static_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _memory(b: int = 5) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 4, 32) * 5


@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}, {"num_beams": 3, "min_new_tokens": 7},
                                {"num_beams": 2, "no_repeat_ngram_size": 2, "length_penalty": 0.5}],
                         ids=["greedy", "beam3", "beam3-min-length", "beam2-ngram"])
def test_static_cache_decodes_as_the_dynamic_one(peaky_gpt2, kw):
    tok, cfg = peaky_gpt2.tokenizer, GenerationConfig.from_kwargs(max_new_tokens=10, **kw)
    args = (peaky_gpt2.decoder, _memory(), tok.bos_id, tok.eos_id, tok.pad_id, cfg)
    dynamic, static = generate(*args), generate(*args, attention=static_attention)
    assert torch.equal(static.sequences, dynamic.sequences) and torch.equal(static.lengths, dynamic.lengths)
    assert len(set(dynamic.lengths.tolist())) > 1 or kw.get("min_new_tokens")  # images finish apart: `keep` ran
    torch.testing.assert_close(static.scores, dynamic.scores, atol=1e-5, rtol=1e-5)


def test_static_cache_keeps_its_buffers(peaky_gpt2):
    """After `expand`, the steps write into the same buffers, beam reorders included."""
    decoder = peaky_gpt2.decoder
    dec = GPT2Decoding(decoder, _memory(2), max_len=8, attention=static_attention)
    assert isinstance(dec.attention, StaticAttention)
    seqs = torch.full((2, 1), peaky_gpt2.tokenizer.bos_id)
    dec(seqs)
    dec.expand(3)
    seqs = seqs.repeat_interleave(3, 0)
    addresses = [kv.data_ptr() for kv in dec.attention.kv]
    shapes = [tuple(kv.shape) for kv in dec.attention.kv]
    assert shapes[0] == (2, 6, decoder.config.n_head, 8, decoder.config.n_embd // decoder.config.n_head)
    for step in range(4):
        dec.reorder(torch.tensor([2, 0, 1, 5, 5, 3]))
        seqs = torch.cat([seqs, torch.full((6, 1), 4 + step)], 1)
        logits, _ = dec(seqs)
        assert logits.shape == (6, decoder.config.vocab_size)
    assert [kv.data_ptr() for kv in dec.attention.kv] == addresses
    assert [tuple(kv.shape) for kv in dec.attention.kv] == shapes
    assert dec.attention.pos.item() == 4 and torch.isinf(dec.attention.bias[5:]).all() and (dec.attention.bias[:5] == 0).all()
