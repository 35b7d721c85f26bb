"""Decoding equals transformers' generate; cached equals uncached; edge cases do not crash."""
import pytest
import torch
from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from mmcap.generation.gpt2_pass import gelu_tanh
from mmcap.generation import GenerationConfig, generate
from mmcap.generation.beams import slot_order as _slot_order
from mmcap.generation.processors import ban_repeated_ngrams, topk_rows, warp_for_sampling

V, BOS, EOS, PAD = 12, 1, 2, 0
SETTINGS = [
    {},
    {"num_beams": 3},
    {"num_beams": 4, "length_penalty": 0.5},
    {"num_beams": 3, "early_stopping": True},
    {"num_beams": 5, "early_stopping": "never"},
    {"num_beams": 2, "no_repeat_ngram_size": 2, "min_new_tokens": 3},
    {"no_repeat_ngram_size": 1},
]


pytestmark = pytest.mark.usefixtures("one_thread")



def decode_every_row_to_the_end(monkeypatch):
    import functools

    from mmcap.generation import beam_search, decode, greedy

    monkeypatch.setattr(decode, "beam_search", functools.partial(beam_search.beam_search, drop_finished=False))
    monkeypatch.setattr(decode, "greedy_or_sample", functools.partial(greedy.greedy_or_sample, drop_finished=False))


def peaky_decoder(family: str, seed: int):
    """A random decoder with sharp distributions, so EOS comes at different lengths."""
    torch.manual_seed(seed)
    special = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=40, n_embd=32, n_layer=2, n_head=2, add_cross_attention=True, **special)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         is_decoder=True, add_cross_attention=True, **special)
        model = BertLMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def image_tokens(b: int, seed: int = 100) -> torch.Tensor:
    """Large-norm image tokens, so that each image steers its caption (and its length)."""
    torch.manual_seed(seed)
    return torch.randn(b, 5, 32) * 10


def hf_generate(model, family, memory, **kw):
    extra = {"cache": EncoderDecoderCache(DynamicCache(), DynamicCache())} if family == "bert" else {}
    b = memory.shape[0]
    return model.generate(
        input_ids=torch.full((b, 1), BOS), attention_mask=torch.ones(b, 1, dtype=torch.long),
        encoder_hidden_states=memory, do_sample=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS,
        return_dict_in_generate=True, output_scores=True, **kw, **extra,
    )


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("seed", [0, 3, 7])
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "greedy")
def test_equals_transformers_generate(family, seed, kw):
    model = peaky_decoder(family, seed)
    memory = image_tokens(4)
    ours = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=8, **kw))
    ref = hf_generate(model, family, memory, max_new_tokens=8, **kw)
    ref_seq = ref.sequences[:, 1:]
    for i in range(4):
        n = int(ours.lengths[i])
        assert ours.sequences[i, :n].tolist() == ref_seq[i, :n].tolist()
        # transformers pads finished rows (with EOS when pad id is 0); nothing real follows
        assert set(ref_seq[i, n:].tolist()) <= {PAD, EOS}
        if n < 8:
            assert ours.sequences[i, n - 1] == EOS
    if kw.get("num_beams", 1) > 1:
        lp = kw.get("length_penalty", 1.0)
        torch.testing.assert_close(ours.scores / ours.lengths.float() ** lp, ref.sequences_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}, {"num_beams": 2, "no_repeat_ngram_size": 2}])
def test_cached_equals_uncached(family, kw):
    model = peaky_decoder(family, 1)
    memory = image_tokens(3)
    cached = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=10, **kw), True)
    plain = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=10, use_cache=False, **kw), True)
    assert torch.equal(cached.sequences, plain.sequences)
    assert torch.equal(cached.lengths, plain.lengths)
    torch.testing.assert_close(cached.scores, plain.scores, atol=1e-5, rtol=1e-5)
    for a, b in zip(cached.cross_attentions, plain.cross_attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scores_are_sequence_log_probs():
    """The returned score is the sum of the model's log-probs of the generated tokens."""
    model = peaky_decoder("gpt2", 2)
    memory = image_tokens(2)
    out = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=6, num_beams=3))
    for i in range(2):
        ids = torch.tensor([[BOS] + out.sequences[i, : out.lengths[i]].tolist()])
        logp = model(input_ids=ids[:, :-1], encoder_hidden_states=memory[i : i + 1]).logits.log_softmax(-1)
        expected = logp[0].gather(1, ids[0, 1:, None]).sum()
        torch.testing.assert_close(out.scores[i], expected, atol=1e-4, rtol=1e-4)


def test_no_beam_finishes_returns_best_unfinished():
    model = peaky_decoder("gpt2", 0)
    with torch.no_grad():
        model.lm_head.weight[EOS] = -100.0  # EOS (almost) never wins
    memory = image_tokens(3)
    out = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=5, num_beams=3))
    assert out.sequences.shape == (3, 5)
    assert out.lengths.tolist() == [5, 5, 5]
    assert (out.sequences != EOS).all()


@pytest.mark.parametrize("family,seed", [("bert", 0), ("gpt2", 3)])
@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}])
def test_batch_size_one_and_batched_agree(family, seed, kw):
    model = peaky_decoder(family, seed)
    memory = image_tokens(4)
    batched = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=8, **kw))
    assert len(set(batched.lengths.tolist())) > 1, "test needs rows that finish at different lengths"
    for i in range(4):
        single = generate(model, memory[i : i + 1], BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=8, **kw))
        n = int(batched.lengths[i])
        assert single.lengths.tolist() == [n]
        assert single.sequences[0, :n].tolist() == batched.sequences[i, :n].tolist()


def test_more_beams_than_vocabulary():
    model = peaky_decoder("gpt2", 0)
    memory = image_tokens(2)
    out = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=4, num_beams=30))
    assert out.sequences.shape[0] == 2 and (out.lengths >= 1).all()
    assert torch.isfinite(out.scores).all()


def test_min_new_tokens_and_sampling_filters():
    model = peaky_decoder("gpt2", 5)
    memory = image_tokens(4)
    out = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=6, min_new_tokens=4))
    assert (out.lengths >= 4).all()
    torch.manual_seed(0)
    sampled = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=6, do_sample=True, top_k=1))
    greedy = generate(model, memory, BOS, EOS, PAD, GenerationConfig.from_kwargs(max_new_tokens=6))
    assert torch.equal(sampled.sequences, greedy.sequences)  # top_k=1 sampling is greedy


def test_logit_filters():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    warped = warp_for_sampling(scores.clone(), GenerationConfig(do_sample=True, top_k=2))
    assert torch.isinf(warped[0, :2]).all() and torch.isfinite(warped[0, 2:]).all()
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    warped = warp_for_sampling(p, GenerationConfig(do_sample=True, top_k=0, top_p=0.7))
    assert torch.isfinite(warped[0, :2]).all() and torch.isinf(warped[0, 2:]).all()
    seqs = torch.tensor([[1, 5, 6, 5]])
    banned = ban_repeated_ngrams(torch.zeros(1, 8), seqs, 2)
    assert torch.isinf(banned[0, 6]) and torch.isfinite(banned).sum() == 7


def test_bad_generation_arguments():
    with pytest.raises(TypeError, match="num_beam"):
        GenerationConfig.from_kwargs(num_beam=3)
    with pytest.raises(ValueError):
        GenerationConfig.from_kwargs(min_new_tokens=5, max_new_tokens=2)


@pytest.mark.parametrize("rows,width,k,chunk", [(48, 50257, 7, 256), (5, 3000, 4, 256), (3, 2048, 3, 256),
                                                (4, 1100, 2, 128), (2, 300, 7, 256)])
def test_topk_rows_equals_torch_topk(rows, width, k, chunk):
    torch.manual_seed(0)
    x = torch.log_softmax(torch.randn(rows, width) * 3, -1)
    assert all(torch.equal(a, b) for a, b in zip(topk_rows(x, k, chunk), torch.topk(x, k)))
    x[0, -2:] = 5.0  # the best in the short last chunk, and a tie
    x[-1] = float("-inf")  # a row with a single allowed token
    x[-1, 7] = 0.0
    values, index = topk_rows(x, k, chunk)
    ref_values, ref_index = torch.topk(x, k)
    assert torch.equal(values, ref_values)
    assert set(index[0, :2].tolist()) == {width - 2, width - 1} and index[-1, 0] == 7
    assert torch.equal(index[1:-1], ref_index[1:-1])


def test_gelu_tanh_is_gpt2s_gelu_to_fp32_rounding():
    x = torch.cat([torch.linspace(-20, 20, 4001), torch.randn(48 * 3072) * 3])
    ref = torch.nn.functional.gelu(x.double(), approximate="tanh")
    assert float((gelu_tanh(x).double() - ref).abs().max()) < 2e-6
    assert float((torch.nn.functional.gelu(x, approximate="tanh").double() - ref).abs().max()) < 2e-6  # torch's own error


def test_new_beams_keep_their_parents_slots_where_they_can():
    parent = torch.tensor([[0, 0, 1], [2, 2, 2], [1, 2, 0], [0, 1, 2]])
    order = _slot_order(parent)
    assert order.tolist() == [[0, 2, 1], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert sorted(order[1].tolist()) == [0, 1, 2]  # a permutation of the new beams
    stays = (parent.gather(1, order) == torch.arange(3)).sum(1)
    assert stays.tolist() == [2, 1, 3, 3]  # one per distinct parent: the fewest cache copies


def test_gpt2_pass_reorders_like_transformers_cache():
    """GPT-2's lean pass against the transformers forward over the same rows: beam moves that
    keep their sources (applied lazily, per layer), moves that overwrite a source (gathered at
    once) and two reorders between steps all give the same next-token logits."""
    from mmcap.generation.gpt2_pass import GPT2Decoding
    from mmcap.generation.hf_pass import HFDecoding

    model = peaky_decoder("gpt2", 0)
    memory = image_tokens(2)
    lean = GPT2Decoding(model, memory, max_len=8)
    ref = HFDecoding(model, memory, use_cache=True, attentions=False)
    seqs = torch.full((2, 1), BOS)
    for dec in (lean, ref):
        dec(seqs)
        dec.expand(3)
    seqs = seqs.repeat_interleave(3, 0)
    torch.manual_seed(1)
    reorders = [[[0, 0, 2, 3, 3, 5]], [[1, 0, 2, 4, 5, 3]], [[0, 0, 1, 3, 3, 3], [2, 1, 0, 5, 4, 3]], [[0, 1, 2, 3, 4, 5]]]
    for step, rows_list in enumerate(reorders):
        seqs = torch.cat([seqs, torch.randint(3, V, (6, 1))], 1)
        a, b = lean(seqs)[0], ref(seqs)[0]
        assert torch.allclose(a, b, atol=1e-5), step
        for rows in rows_list:
            rows = torch.tensor(rows)
            seqs = seqs[rows]
            lean.reorder(rows)
            ref.reorder(rows)
    seqs = torch.cat([seqs, torch.randint(3, V, (6, 1))], 1)
    assert torch.allclose(lean(seqs)[0], ref(seqs)[0], atol=1e-5)


@pytest.mark.parametrize("family,use_cache,seed", [("gpt2", True, 4), ("bert", True, 0), ("gpt2", False, 4)])
def test_finished_images_leave_the_batch_and_results_stay(monkeypatch, family, use_cache, seed):
    """Beam search stops decoding the images it has finished with (the pass drops their rows: GPT-2's
    lean pass, the transformers forward cached and uncached): the same captions, scores and
    hypotheses as decoding every image to the end, and as transformers."""
    from mmcap.generation.gpt2_pass import GPT2Decoding
    from mmcap.generation.hf_pass import HFDecoding

    pass_type = GPT2Decoding if family == "gpt2" and use_cache else HFDecoding
    model, memory = peaky_decoder(family, seed), image_tokens(8, seed=100 + seed)
    cfg = GenerationConfig.from_kwargs(max_new_tokens=12, num_beams=3, use_cache=use_cache)
    kept = []
    keep = pass_type.keep
    monkeypatch.setattr(pass_type, "keep", lambda self, images: (kept.append(len(images)), keep(self, images)))
    ours = generate(model, memory, BOS, EOS, PAD, cfg)
    assert kept and kept == sorted(kept, reverse=True) and kept[-1] < 8  # images left as they finished
    decode_every_row_to_the_end(monkeypatch)  # the same results, without dropping images
    full = generate(model, memory, BOS, EOS, PAD, cfg)
    assert torch.equal(ours.sequences, full.sequences) and torch.equal(ours.lengths, full.lengths)
    assert torch.equal(ours.scores, full.scores)
    assert [[(h.tolist(), s) for h, s in hyps] for hyps in ours.hypotheses] == \
        [[(h.tolist(), s) for h, s in hyps] for hyps in full.hypotheses]
    ref = hf_generate(model, family, memory, max_new_tokens=12, num_beams=3)
    for i in range(8):
        n = int(ours.lengths[i])
        assert ours.sequences[i, :n].tolist() == ref.sequences[i, 1 : n + 1].tolist()


@pytest.mark.parametrize("kw", [{}, {"no_repeat_ngram_size": 2, "min_new_tokens": 2}], ids=["greedy", "ngram-min"])
def test_greedy_rows_leave_the_batch_at_eos_and_results_stay(monkeypatch, kw):
    """Greedy rows that reach EOS leave GPT-2's pass: the same captions and scores as decoding every
    row to the end, and as transformers."""
    from mmcap.generation.gpt2_pass import GPT2Decoding

    model, memory = peaky_decoder("gpt2", 7), image_tokens(6, seed=107)
    cfg = GenerationConfig.from_kwargs(max_new_tokens=12, **kw)
    kept = []
    keep = GPT2Decoding.keep
    monkeypatch.setattr(GPT2Decoding, "keep", lambda self, images: (kept.append(len(images)), keep(self, images)))
    ours = generate(model, memory, BOS, EOS, PAD, cfg)
    assert kept and kept == sorted(kept, reverse=True) and kept[0] < 6  # rows left as they finished
    decode_every_row_to_the_end(monkeypatch)  # the same results, without dropping images
    full = generate(model, memory, BOS, EOS, PAD, cfg)
    assert torch.equal(ours.sequences, full.sequences) and torch.equal(ours.lengths, full.lengths)
    torch.testing.assert_close(ours.scores, full.scores, atol=0, rtol=0)
    ref = hf_generate(model, "gpt2", memory, max_new_tokens=12, **kw).sequences[:, 1:]
    for i in range(6):
        n = int(ours.lengths[i])
        assert ours.sequences[i, :n].tolist() == ref[i, :n].tolist()
        assert set(ours.sequences[i, n:].tolist()) <= {PAD}
