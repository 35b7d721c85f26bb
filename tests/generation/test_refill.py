"""Slot refill (`mmcap.generation.refill`): each image's search is beam search's for it alone,
whichever slot it lands in and whatever the other slots are doing; and the per-row positions the
kernels keep for it."""
import pytest
import torch

from mmcap.accel import kernels as compiled
from mmcap.accel.kernel_attention import refill_attention
from mmcap.generation import refill
from mmcap.generation.gpt2_pass import GPT2Decoding

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(compiled.kernels() is None, reason="no C++ compiler here")]


def test_rows_at_their_own_positions_attend_as_if_each_were_alone():
    """self_attend_rows with a length per row equals self_attend run per row at that length."""
    ops = compiled.kernels()
    torch.manual_seed(0)
    n, heads, d, positions = 5, 2, 32, 8
    k, v = torch.randn(n, heads, positions, d), torch.randn(n, heads, positions, d)
    qkv = torch.randn(n, 3 * heads * d)
    anc = torch.arange(n)[:, None].repeat(1, positions)  # each row reads its own cache row
    lens = torch.tensor([1, 4, 8, 2, 5])
    k_rows, v_rows = k.clone(), v.clone()
    got = ops.self_attend_rows(qkv, k_rows, v_rows, anc, lens, 0.125)
    for r in range(n):
        k_one, v_one = k.clone(), v.clone()
        want = ops.self_attend(qkv, k_one, v_one, anc, int(lens[r]), 0.125)
        torch.testing.assert_close(got[r], want[r], rtol=0, atol=0)
        assert torch.equal(k_rows[r, :, lens[r] - 1], k_one[r, :, lens[r] - 1])
    with pytest.raises(RuntimeError, match="lens: positions beyond the caches"):
        ops.self_attend_rows(qkv, k_rows, v_rows, anc, lens + 1, 0.125)


@pytest.fixture
def talkative(tiny_gpt2, image_files):
    """tiny_gpt2 trained until it says each image's caption, whose lengths differ (3 to 7 words)."""
    from helpers import train_on_captions

    return train_on_captions(tiny_gpt2, image_files, steps=60)


@pytest.mark.parametrize("slots", [2, 3])
def test_each_image_gets_the_caption_and_log_prob_of_beam_search_alone(talkative, image_files, slots):
    """Six images through two or three slots, so that slots are refilled while others run: every
    image's caption and log-prob equal `generate`'s (batch at a time), in whatever order they finish."""
    model = talkative
    paths = [str(p) for p in image_files] * 2
    paths = paths[:6]
    cfg = model.generation_options(num_beams=3, max_new_tokens=12, min_new_tokens=1)
    assert refill.supports(cfg)
    with torch.no_grad():
        pixels, _ = model.preprocess(paths)
        memory = model.project(model.encoder(pixels))
        want = model.generate(pixels, num_beams=3, max_new_tokens=12, min_new_tokens=1)
    cfg_dec = model.decoder.config
    backend = refill_attention(cfg_dec.hidden_size // cfg_dec.num_attention_heads, torch.float32)
    made = []

    def make_pass(first):
        made.append(first.shape[0])
        return GPT2Decoding(model.decoder, first, max_len=13, attention=backend)

    tok = model.tokenizer
    got = list(refill.refill_beam_search(make_pass, enumerate(memory), slots, tok.bos_id, tok.eos_id, tok.pad_id, cfg))
    assert made == [slots] and sorted(i for i, _, _ in got) == list(range(6))
    lengths = want.lengths.tolist()
    assert len(set(lengths)) > 1  # captions of different lengths: slots do free up at different steps
    for i, tokens, log_prob in got:
        assert tokens.tolist() == want.sequences[i, : lengths[i]].tolist(), i
        assert log_prob == pytest.approx(float(want.scores[i]), rel=1e-5, abs=1e-5)


def test_what_refill_does_not_decode_falls_back(peaky_gpt2, image_files):
    """Greedy, sampling, banned n-grams and prompts keep batch-at-a-time decoding."""
    options = peaky_gpt2.generation_options
    assert not refill.supports(options(num_beams=1))
    assert not refill.supports(options(num_beams=3, do_sample=True))
    assert not refill.supports(options(num_beams=3, no_repeat_ngram_size=2))
    assert not refill.supports(options(num_beams=3), prompt="a photo of")
    paths = [str(p) for p in image_files]
    stream = peaky_gpt2.caption_stream(paths, num_beams=1, max_new_tokens=4, num_workers=0)
    assert not stream.refilling
    assert [r["caption"] for r in stream] == peaky_gpt2.caption(paths, num_beams=1, max_new_tokens=4)
