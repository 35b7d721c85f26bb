"""Any causal LM as the decoder: families from config and from checkpoints, the two fusions, and
the train modes. Tiny random checkpoints with their own offline-trained tokenizers, nothing fetched."""
import json
import warnings

import pytest
import torch
from helpers import CAPTIONS, circle_images, tiny_config

from mmcap import Captioner
from mmcap.generation import GenerationConfig, generate
from mmcap.model.tokenizer import CaptionTokenizer
from mmcap.generation.lm_pass import LMDecoding

pytestmark = pytest.mark.usefixtures("one_thread")

# How each family's own tokenizer names its special tokens (Qwen2's has no BOS, none has a PAD but Qwen2).
SPECIALS = {
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "qwen2": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "gpt_neox": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
}
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"



def decode_every_row_to_the_end(monkeypatch):
    import functools

    from mmcap.generation import beam_search, decode, greedy

    monkeypatch.setattr(decode, "beam_search", functools.partial(beam_search.beam_search, drop_finished=False))
    monkeypatch.setattr(decode, "greedy_or_sample", functools.partial(greedy.greedy_or_sample, drop_finished=False))


def family_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=sorted(set(specials.values())),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CAPTIONS * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if family == "qwen2":
        hf.chat_template = CHAT_TEMPLATE
    return hf


def make_checkpoint(family: str, directory, seed: int = 0, **sizes):
    """A tiny random `family` causal LM saved with its own tokenizer, as a hub checkpoint is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = family_tokenizer(family)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=128) | sizes
    config = AutoConfig.for_model(family, vocab_size=len(hf), bos_token_id=hf.bos_token_id,
                                  eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id, **sizes)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    hf.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: make_checkpoint(f, tmp_path_factory.mktemp(f)) for f in SPECIALS}


def pretrained_config(path: str, **decoder) -> dict:
    cfg = tiny_config()
    cfg["decoder"] = {"pretrained": path, **decoder}
    return cfg


def sharpen(lm, eos: int, factor: float = 3.0):
    """Sharper next-token distributions and a likelier EOS, so that captions end at different lengths."""
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(factor)
        lm.get_output_embeddings().weight[eos] *= 4
    return lm


# ---------------------------------------------------------------- families and checkpoints


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_family_built_from_config(family):
    torch.manual_seed(0)
    model = Captioner.from_config(tiny_config(family, ), captions=CAPTIONS).eval()
    assert model.decoder.config.model_type == family
    assert model.decoder.config.hidden_size == 32 and model.decoder.config.num_hidden_layers == 2
    assert isinstance(model.caption(circle_images()[0], max_new_tokens=5), str)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_pretrained_directory_gives_family_sizes_weights_and_tokenizer(checkpoints, family):
    from transformers import AutoModelForCausalLM

    model = Captioner.from_config(pretrained_config(checkpoints[family], fusion="prefix")).eval()
    assert model.decoder.config.model_type == family  # decoder.family (default gpt2) is not consulted
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    torch.testing.assert_close(model.decoder.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    assert len(model.tokenizer) == len(family_tokenizer(family))
    assert isinstance(model.caption(circle_images()[0], max_new_tokens=4), str)


def test_tokenizer_without_bos_starts_with_eos_and_ignores_chat_template(checkpoints):
    tok = CaptionTokenizer.load(checkpoints["qwen2"])
    assert tok.hf.bos_token is None and tok.hf.chat_template
    assert tok.bos_id == tok.eos_id == tok.pad_id
    ids = tok.encode("a red circle")
    assert ids[0] == ids[-1] == tok.eos_id
    assert tok.decode(ids[1:]) == "a red circle"
    assert "<|im_start|>" not in tok.hf.decode(ids)


def test_llama_tokenizer_pads_with_eos(checkpoints):
    tok = CaptionTokenizer.load(checkpoints["llama"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tok.hf.convert_tokens_to_ids("<s>"),) + 2 * (tok.hf.eos_token_id,)


def test_checkpoint_needing_custom_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mystery_lm", "architectures": ["MysteryForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"},
    }))
    (tmp_path / "modeling_mystery.py").write_text("raise SystemExit('checkpoint code ran')\n")
    with pytest.raises(ValueError, match="MysteryForCausalLM.*custom code"):
        Captioner.from_config(pretrained_config(str(tmp_path)), tokenizer=CaptionTokenizer.train(CAPTIONS))


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ValueError, match="llama, qwen2"):
        Captioner.from_config(tiny_config("no_such_lm"), captions=CAPTIONS)


# ---------------------------------------------------------------- prefix fusion


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}, {"num_beams": 2, "no_repeat_ngram_size": 2}],
                         ids=["greedy", "beam3", "beam2-ngram"])
def test_prefix_equals_transformers_generate_on_inputs_embeds(checkpoints, family, kw):
    model = Captioner.from_config(pretrained_config(checkpoints[family], fusion="prefix")).eval()
    tok = model.tokenizer
    lm = sharpen(model.decoder, tok.eos_id)
    torch.manual_seed(1)
    memory = torch.randn(3, 5, 32) * 3
    ours = generate(lm, memory, tok.bos_id, tok.eos_id, tok.pad_id,
                    GenerationConfig.from_kwargs(max_new_tokens=8, **kw), fusion=model.fusion)
    bos = lm.get_input_embeddings()(torch.full((3, 1), tok.bos_id))
    with torch.no_grad():
        ref = lm.generate(inputs_embeds=torch.cat([memory, bos], 1), attention_mask=torch.ones(3, 6, dtype=torch.long),
                          max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **kw)
    lengths = ours.lengths.tolist()
    assert len(set(lengths)) > 1 or max(lengths) < 8  # some caption ended early: the test has teeth
    for i, n in enumerate(lengths):
        assert ours.sequences[i, :n].tolist() == ref[i, :n].tolist()


def test_prefix_teacher_forcing_matches_stepwise_decoding(checkpoints):
    model = Captioner.from_config(pretrained_config(checkpoints["llama"], fusion="prefix")).eval()
    torch.manual_seed(2)
    memory = torch.randn(2, 5, 32)
    batch = model.tokenizer(CAPTIONS[:2])
    full = model.fusion.logits(model.decoder, memory, batch["input_ids"], batch["attention_mask"])
    dec = LMDecoding(model.decoder, model.fusion, memory, use_cache=True, attentions=False)
    with torch.no_grad():
        for t in range(3):
            step, _ = dec(batch["input_ids"][:, : t + 1])
            torch.testing.assert_close(step, full[:, t].float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- inserted cross-attention


def open_gates(model, value: float = 1.0):
    with torch.no_grad():
        for block in model.fusion.blocks:
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)
    return model


def test_inserted_blocks_start_as_the_plain_lm(checkpoints):
    from transformers import AutoModelForCausalLM

    model = Captioner.from_config(pretrained_config(checkpoints["llama"], cross_attention_every=1)).eval()
    assert len(model.fusion.blocks) == 2
    ids = model.tokenizer(CAPTIONS[:2])["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    with torch.no_grad():
        fused = model.fusion.logits(model.decoder, torch.randn(2, 5, 32), ids)
        torch.testing.assert_close(fused, plain(input_ids=ids).logits)
        # the state dict keeps the LM's own names (pretrained loading and LoRA see the plain LM)
        assert set(plain.state_dict()) <= {k.removeprefix("decoder.") for k in model.state_dict()}


def test_cross_attention_every_k_th_layer(checkpoints):
    path = make_checkpoint("llama", checkpoints["llama"] + "-4", num_hidden_layers=4)
    model = Captioner.from_config(pretrained_config(path, cross_attention_every=2))
    assert model.fusion.at == [0, 2]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}, {"num_beams": 2, "no_repeat_ngram_size": 2}],
                         ids=["greedy", "beam3", "beam2-ngram"])
def test_inserted_cross_attention_cached_equals_uncached(checkpoints, family, kw):
    model = open_gates(Captioner.from_config(pretrained_config(checkpoints[family]))).eval()
    tok = model.tokenizer
    sharpen(model.decoder, tok.eos_id)
    torch.manual_seed(3)
    memory = torch.randn(3, 5, 32) * 3
    outs = [generate(model.decoder, memory, tok.bos_id, tok.eos_id, tok.pad_id,
                     GenerationConfig.from_kwargs(max_new_tokens=8, use_cache=cache, **kw), fusion=model.fusion)
            for cache in (True, False)]
    assert outs[0].lengths.tolist() == outs[1].lengths.tolist()
    assert outs[0].sequences.tolist() == outs[1].sequences.tolist()
    torch.testing.assert_close(outs[0].scores, outs[1].scores, atol=1e-4, rtol=1e-4)


def test_image_keys_and_values_computed_once_per_image(checkpoints, monkeypatch):
    model = open_gates(Captioner.from_config(pretrained_config(checkpoints["llama"]))).eval()
    calls = []
    for block in model.fusion.blocks:
        monkeypatch.setattr(block.key, "forward", lambda x, f=block.key.forward: calls.append(x.shape) or f(x))
    images = circle_images()[:2]
    model.caption(images, num_beams=3, max_new_tokens=6)
    assert calls == [(2, 4, 32)] * 2  # one call per block, on the un-expanded batch of two images


def test_attention_maps_for_both_fusions(checkpoints):
    for fusion in ("prefix", "cross_attention"):
        model = Captioner.from_config(pretrained_config(checkpoints["llama"], fusion=fusion)).eval()
        caption, attention = model.caption(circle_images()[0], return_attention=True, max_new_tokens=4)
        assert attention.shape[1:] == (2, 2) and attention.shape[0] >= 1
        if fusion == "cross_attention":  # all of a block's attention is on the image
            torch.testing.assert_close(attention.sum((1, 2)), torch.ones(attention.shape[0]))


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention"])
def test_gradient_checkpointing_gives_the_same_gradients(checkpoints, fusion):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = pretrained_config(checkpoints["llama"], fusion=fusion, gradient_checkpointing=checkpointing)
        model = Captioner.from_config(cfg).train()
        if fusion == "cross_attention":
            open_gates(model)
        assert model.decoder.is_gradient_checkpointing == checkpointing
        model(torch.randn(2, 3, 64, 64), **model.tokenizer(CAPTIONS[:2])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None and "encoder" not in n})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- train modes


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("encoder.", "projection."))}


def test_train_modes_choose_what_trains(checkpoints):
    path = checkpoints["llama"]
    frozen = Captioner.from_config(pretrained_config(path, train="frozen"))
    assert trainable(frozen) and all(n.startswith("fusion.") for n in trainable(frozen))
    lora = Captioner.from_config(pretrained_config(path, train="lora", lora_rank=2))
    assert {n.split(".")[0] for n in trainable(lora)} == {"fusion", "decoder"}
    assert all("lora_" in n for n in trainable(lora) if n.startswith("decoder."))
    assert any("mlp.down_proj.lora_A" in n for n in trainable(lora))
    gpt2 = Captioner.from_config(tiny_config("gpt2", decoder={**tiny_config()["decoder"], "train": "frozen"}),
                                 captions=CAPTIONS)
    assert trainable(gpt2) and all("crossattention" in n or "ln_cross_attn" in n for n in trainable(gpt2))


def test_lora_export_merges_within_1e_5_and_loads_without_adapters(checkpoints, tmp_path):
    model = Captioner.from_config(pretrained_config(checkpoints["llama"], train="lora", lora_rank=4)).eval()
    with torch.no_grad():  # adapters that change something
        for name, p in model.decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    open_gates(model, 0.5)
    images = circle_images()
    pixels, _ = model.preprocess(images)
    batch = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        before = model.token_log_probs(model.encode(pixels), batch["input_ids"], batch["attention_mask"])
    model.save_pretrained(tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    loaded = Captioner.from_pretrained(tmp_path / "m")
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        after = loaded.token_log_probs(loaded.encode(pixels), batch["input_ids"], batch["attention_mask"])
    assert (before - after).abs().max() < 1e-5
    assert any("lora_" in n for n, _ in model.named_parameters())  # exporting left the training model as it was


QUICK = [("prefix", "full", "llama"), ("cross_attention", "lora", "qwen2"), ("cross_attention", "frozen", "gpt_neox")]
WIDE = [(f, t, fam) for f in ("prefix", "cross_attention") for t in ("full", "lora", "frozen")
        for fam in ("llama", "qwen2", "gpt_neox") if (f, t, fam) not in QUICK]


def train_and_reload(path: str, fusion: str, train: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = Captioner.from_config(pretrained_config(path, fusion=fusion, train=train, lora_rank=4)).train()
    pixels, _ = model.preprocess(circle_images())
    batch = model.tokenizer(CAPTIONS)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(pixels, batch["input_ids"], batch["attention_mask"])
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03, losses
    model.eval()
    captions = model.caption(circle_images(), max_new_tokens=6, num_beams=2)
    model.save_pretrained(tmp_path / "saved")
    assert Captioner.from_pretrained(tmp_path / "saved").caption(circle_images(), max_new_tokens=6, num_beams=2) == captions


@pytest.mark.parametrize("fusion,train,family", QUICK)
def test_fusion_and_train_mode_learn_and_reload(checkpoints, tmp_path, fusion, train, family):
    train_and_reload(checkpoints[family], fusion, train, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fusion,train,family", WIDE)
def test_every_fusion_and_train_mode_learn_and_reload(checkpoints, tmp_path, fusion, train, family):
    train_and_reload(checkpoints[family], fusion, train, tmp_path)


# ---------------------------------------------------------------- current transformers API


@pytest.mark.parametrize("decoder", [{"family": "gpt2"}, {"family": "bert"}, {"family": "llama", "fusion": "prefix"},
                                     {"family": "llama"}], ids=["gpt2", "bert", "llama-prefix", "llama-xattn"])
def test_captioning_prints_no_deprecation_warnings(decoder):
    cfg = tiny_config()
    cfg["decoder"].update(decoder)
    model = Captioner.from_config(cfg, captions=CAPTIONS).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model.caption(circle_images()[:2], max_new_tokens=4)
        model.caption(circle_images()[:2], max_new_tokens=4, num_beams=2, use_cache=False)


def test_lora_training_checkpoint_holds_only_trainable_weights(checkpoints, tmp_path):
    import lightning as L
    from helpers import module_args

    from mmcap.training import CaptionModule

    cfg = pretrained_config(checkpoints["llama"], train="lora", lora_rank=2)
    module = CaptionModule(**module_args(**cfg, lr=1e-3, warmup_steps=1, generation={"max_new_tokens": 5}))
    module.set_captioner(Captioner.from_config(module.captioner_config))
    pixels, _ = module.captioner.preprocess(circle_images())
    batch = {"pixels": pixels, **module.captioner.tokenizer(CAPTIONS), "keys": ["a", "b", "c", "d"], "skipped": {}}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader([batch, batch], batch_size=None))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    weights = torch.load(tmp_path / "lora.ckpt", weights_only=True)["state_dict"]
    decoder = [k for k in weights if k.startswith("captioner.decoder.")]
    assert decoder and all("lora_" in k for k in decoder)
    lm_params = sum(p.numel() for p in module.captioner.decoder.parameters())
    assert sum(weights[k].numel() for k in decoder) < 0.2 * lm_params

    loaded = CaptionModule.load_from_checkpoint(tmp_path / "lora.ckpt")
    expected = module.captioner.eval().caption(circle_images(), max_new_tokens=5)
    assert loaded.captioner.eval().caption(circle_images(), max_new_tokens=5) == expected


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention"])
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_finished_images_leave_the_lm_pass_and_results_stay(checkpoints, monkeypatch, fusion, cache):
    """Beam search drops finished images from an LM's pass (`LMDecoding.keep`): the same captions,
    scores and hypotheses as decoding every row to the end."""
    from mmcap.generation.lm_pass import LMDecoding

    model = Captioner.from_config(pretrained_config(checkpoints["llama"], fusion=fusion)).eval()
    if fusion == "cross_attention":
        open_gates(model)
    tok = model.tokenizer
    sharpen(model.decoder, tok.eos_id)
    torch.manual_seed(5)
    memory = torch.randn(6, 5, 32) * 3
    cfg = GenerationConfig.from_kwargs(max_new_tokens=10, num_beams=3, use_cache=cache)
    kept = []
    keep = LMDecoding.keep
    monkeypatch.setattr(LMDecoding, "keep", lambda self, images: (kept.append(len(images)), keep(self, images)))
    ours = generate(model.decoder, memory, tok.bos_id, tok.eos_id, tok.pad_id, cfg, fusion=model.fusion)
    assert kept and kept[-1] < 6  # some image left the pass before the end
    decode_every_row_to_the_end(monkeypatch)  # the same results, without dropping images
    full = generate(model.decoder, memory, tok.bos_id, tok.eos_id, tok.pad_id, cfg, fusion=model.fusion)
    assert ours.sequences.tolist() == full.sequences.tolist() and ours.lengths.tolist() == full.lengths.tolist()
    torch.testing.assert_close(ours.scores, full.scores, atol=1e-5, rtol=1e-5)
    assert [[h.tolist() for h, _ in hyps] for hyps in ours.hypotheses] == \
        [[h.tolist() for h, _ in hyps] for hyps in full.hypotheses]
