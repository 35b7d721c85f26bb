"""Prompted captioning: `BOS prompt caption EOS`, the prompt conditions the caption and is never
trained on; decoding continues the prompt on every decoder path, batched as alone."""
import json

import pytest
import torch
from helpers import CAPTIONS, circle_images, tiny_config

from mmcap import Captioner
from mmcap.generation import GenerationConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of", "there is", "", "a small drawing showing"]  # three lengths and none
KINDS = {"gpt2": {"family": "gpt2"}, "bert": {"family": "bert"},
         "llama-prefix": {"family": "llama", "fusion": "prefix"}, "llama-xattn": {"family": "llama"}}
EOS_BOOST = {"gpt2": 12, "bert": 3, "llama-prefix": 3, "llama-xattn": 2}  # captions of 1 to 8 tokens each
SEARCHES = [{}, {"num_beams": 3}, {"num_beams": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2}]
SEARCH_IDS = ["greedy", "beam3", "beam2-lp-ngram"]


def model_of(kind: str, sharp: bool = True) -> Captioner:
    """A tiny captioner whose tokenizer knows the prompts' words; `sharp`: peaky distributions, a
    likelier EOS and open fusion gates, so that captions depend on the image and end at different lengths."""
    cfg = tiny_config()
    cfg["decoder"].update(KINDS[kind])
    torch.manual_seed(0)
    model = Captioner.from_config(cfg, captions=CAPTIONS + PROMPTS).eval()
    if sharp:
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.mul_(3)
            model.decoder.get_output_embeddings().weight[model.tokenizer.eos_id] *= EOS_BOOST[kind]
            for block in getattr(model.fusion, "blocks", []):
                block.attn_gate.fill_(1.0)
                block.mlp_gate.fill_(1.0)
    return model


def image_tokens(b: int = 4, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, 5, 32) * 5


def decode(model: Captioner, memory: torch.Tensor, prompts, **kw):
    tok = model.tokenizer
    ids = [tok.prompt_ids(p) for p in prompts]
    cfg = GenerationConfig.from_kwargs(max_new_tokens=8, **kw)
    return generate(model.decoder, memory, tok.bos_id, tok.eos_id, tok.pad_id, cfg, fusion=model.fusion, prompts=ids)


def hand_greedy(model: Captioner, memory: torch.Tensor, prompt: str, max_new_tokens: int = 8) -> list[int]:
    """Greedy decoding by hand: the whole sequence `BOS prompt w_<n` through the teacher-forced
    forward (no cache) at every step, argmax, until EOS."""
    tok = model.tokenizer
    ids = torch.tensor([[tok.bos_id, *tok.prompt_ids(prompt)]])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model.fusion.logits(model.decoder, memory, ids)[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == tok.eos_id:
                break
    return new


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kw", SEARCHES, ids=SEARCH_IDS)
def test_batch_with_prompts_of_different_lengths_equals_each_image_alone(kind, kw):
    model, memory = model_of(kind), image_tokens()
    batched = decode(model, memory, PROMPTS, **kw)
    for i, prompt in enumerate(PROMPTS):
        alone = decode(model, memory[i : i + 1], [prompt], **kw)
        n = int(batched.lengths[i])
        assert alone.lengths.tolist() == [n]
        assert alone.sequences[0, :n].tolist() == batched.sequences[i, :n].tolist()
        torch.testing.assert_close(alone.scores[0], batched.scores[i], atol=1e-4, rtol=1e-4)
        if kw:
            assert [(h.tolist(), round(s, 3)) for h, s in alone.hypotheses[0]] == \
                [(h.tolist(), round(s, 3)) for h, s in batched.hypotheses[i]]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_continues_the_prompt_as_hand_fed_decoding_does(kind):
    model, memory = model_of(kind), image_tokens()
    out = decode(model, memory, PROMPTS)
    lengths = out.lengths.tolist()
    assert len(set(lengths)) > 1 or max(lengths) < 8  # some caption ended early: the test has teeth
    for i, prompt in enumerate(PROMPTS):
        assert out.sequences[i, : lengths[i]].tolist() == hand_greedy(model, memory[i : i + 1], prompt)
    # the prompt changes the caption (else the tests above would not tell a prompt from none)
    unprompted = decode(model, memory, [""] * 4)
    assert [out.sequences[i, :n].tolist() for i, n in enumerate(lengths)] != \
        [unprompted.sequences[i, :n].tolist() for i, n in enumerate(unprompted.lengths.tolist())]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kw", SEARCHES, ids=SEARCH_IDS)
def test_prompted_decoding_equals_transformers_generate(kind, kw):
    """transformers' own `generate` from `BOS prompt`: input_ids for GPT-2/BERT, the image prefix
    as inputs_embeds, the inserted blocks attending to the image (repeated per beam, as generate
    repeats the rows)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    if kind == "llama-prefix":  # from inputs_embeds, transformers bans repeats of generated n-grams only
        kw = {k: v for k, v in kw.items() if k != "no_repeat_ngram_size"}
    model, memory = model_of(kind), image_tokens(2)
    tok, lm, k = model.tokenizer, model.decoder, kw.get("num_beams", 1)
    prompt = "a small drawing showing"
    start = torch.tensor([[tok.bos_id, *tok.prompt_ids(prompt)]] * 2)
    opts = dict(max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **kw)
    with torch.no_grad():
        if kind in ("gpt2", "bert"):
            cache = {"cache": EncoderDecoderCache(DynamicCache(), DynamicCache())} if kind == "bert" else {}
            ref = lm.generate(input_ids=start, encoder_hidden_states=memory, **opts, **cache)[:, start.shape[1]:]
        elif kind == "llama-prefix":
            embeds = torch.cat([memory, lm.get_input_embeddings()(start)], dim=1)
            ref = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              **opts)
        else:
            fusion = model.fusion
            with fusion.attending(fusion.repeat(fusion.image_state(memory), k)):
                ref = lm.generate(input_ids=start, attention_mask=torch.ones_like(start), **opts)[:, start.shape[1]:]
    ours = decode(model, memory, [prompt] * 2, **kw)
    for i, n in enumerate(ours.lengths.tolist()):
        assert ours.sequences[i, :n].tolist() == ref[i, :n].tolist()
        assert set(ref[i, n:].tolist()) <= {tok.pad_id, tok.eos_id}


@pytest.mark.parametrize("kind", ["gpt2", "llama-prefix"])
def test_score_is_the_log_prob_of_the_continuation(kind):
    """The returned log-prob is that of the generated tokens given image and prompt: the
    teacher-forced log-probs of `BOS prompt caption` summed over the caption's positions."""
    model, memory = model_of(kind), image_tokens(2)
    prompts = ["a photo of", "there is"]
    out = decode(model, memory, prompts, num_beams=3)
    tok = model.tokenizer
    for i, prompt in enumerate(prompts):
        head = [tok.bos_id, *tok.prompt_ids(prompt)]
        ids = torch.tensor([head + out.sequences[i, : out.lengths[i]].tolist()])
        with torch.no_grad():
            logp = model.token_log_probs(memory[i : i + 1], ids, torch.ones_like(ids))
        torch.testing.assert_close(out.scores[i], logp[0, len(head) - 1 :].sum(), atol=1e-4, rtol=1e-4)


def test_caption_with_prompt_on_images():
    """`caption(prompt=...)`: one str for all or one per image; the batch equals each image alone,
    the text is the continuation only, and None is the unprompted caption."""
    model, images = model_of("gpt2"), circle_images()
    pixels, _ = model.preprocess(images)
    batched = model.caption(images, prompt=PROMPTS, max_new_tokens=8)
    assert batched == [model.caption(im, prompt=p, max_new_tokens=8) for im, p in zip(images, PROMPTS)]
    with torch.no_grad():
        memory = model.encode(pixels)
    tok = model.tokenizer
    assert batched == [tok.decode(hand_greedy(model, memory[i : i + 1], p)) for i, p in enumerate(PROMPTS)]
    assert model.caption(images, prompt="there is", max_new_tokens=8) == \
        model.caption(images, prompt=["there is"] * 4, max_new_tokens=8)
    assert model.caption(images, prompt=None, max_new_tokens=8) == model.caption(images, max_new_tokens=8)
    details = model.caption_details(images[:2], prompt="a photo of", num_beams=2, max_new_tokens=8)
    assert [d.caption for d in details] == model.caption(images[:2], prompt="a photo of", num_beams=2, max_new_tokens=8)
    result = model.caption(images, prompt=PROMPTS, max_new_tokens=8, return_attention=True)
    captions, attention = result
    assert captions == batched and [a.shape[1:] for a in attention] == [(2, 2)] * 4
    assert [len(w) for w in result.words] == [a.shape[0] for a in attention]
    with pytest.raises(ValueError, match="one per image"):
        model.caption(images, prompt=["a photo of"] * 3)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_a_prompt_longer_than_the_position_table_is_refused_by_name(kind):
    model, images = model_of(kind), circle_images()[:2]
    limit = model.decoder.config.max_position_embeddings
    long = " ".join(["circle"] * limit)
    with pytest.raises(ValueError, match=rf"image 1's prompt of \d+ tokens.*the decoder has {limit}"):
        model.caption(images, prompt=["a", long], max_new_tokens=4)
    with pytest.raises(ValueError, match=rf"max_new_tokens={limit}.*the decoder has {limit}"):
        model.caption(images, max_new_tokens=limit)
    fits = limit - 1 - 4 - 1  # BOS, the prompt, 4 new tokens: one position to spare
    assert len(model.caption(images, prompt=" ".join(["circle"] * fits), max_new_tokens=4)) == 2


def test_score_given_a_prompt_counts_the_caption_only():
    model, images = model_of("llama-prefix"), circle_images()[:2]
    captions = ["a red circle", "a blue square on the left"]
    pixels, _ = model.preprocess(images)
    batch = model.tokenizer(captions, prompts=["a photo of", "there is"])
    with torch.no_grad():
        logp = model.token_log_probs(model.encode(pixels), batch["input_ids"], batch["attention_mask"])
    expected = (logp * (batch["labels"][:, 1:] != -100)).sum(1)
    torch.testing.assert_close(model.score(images, captions, prompt=["a photo of", "there is"]), expected)
    assert not torch.allclose(model.score(images, captions, prompt="a photo of"), model.score(images, captions))


# ---------------------------------------------------------------- training targets


def test_labels_mask_bos_prompt_and_padding_exactly():
    model = model_of("gpt2", sharp=False)
    tok = model.tokenizer
    batch = tok(["a red circle", "a small yellow star"], prompts=["a photo of", None])
    p = tok.prompt_ids("a photo of")
    c0, c1 = tok.hf("a red circle")["input_ids"], tok.hf("a small yellow star")["input_ids"]
    assert len(p) == 3 and len(c0) == 3 and len(c1) == 4
    row0 = [tok.bos_id, *p, *c0, tok.eos_id]
    row1 = [tok.bos_id, *c1, tok.eos_id]
    row1_padded = row1 + [tok.pad_id] * (len(row0) - len(row1))
    assert batch["input_ids"].tolist() == [row0, row1_padded]
    assert batch["attention_mask"].tolist() == [[1] * len(row0), [1] * len(row1) + [0] * (len(row0) - len(row1))]
    assert batch["labels"].tolist() == [[-100] * 4 + c0 + [tok.eos_id],
                                        [-100] + c1 + [tok.eos_id] + [-100] * (len(row0) - len(row1))]
    # without prompts the labels are what the loss always used: every token after BOS but padding
    plain = tok(["a red circle", "a small yellow star"])
    assert torch.equal(plain["labels"], plain["input_ids"].masked_fill(plain["attention_mask"] == 0, -100)
                       .index_fill(1, torch.tensor([0]), -100))


@pytest.mark.parametrize("kind", ["gpt2", "llama-xattn"])
def test_loss_ignores_the_prompt_tokens(kind):
    """The loss is the mean cross-entropy of the caption tokens and EOS given image and prompt; the
    prompt's own tokens are inputs only: what they would predict never enters it."""
    model = model_of(kind, sharp=False)
    tok = model.tokenizer
    pixels, _ = model.preprocess(circle_images()[:2])
    captions, prompts = ["a red circle", "a blue square on the left"], ["a photo of", "there is"]
    batch = tok(captions, prompts=prompts)
    with torch.no_grad():
        memory = model.encode(pixels)
        loss = model(None, batch["input_ids"], batch["attention_mask"], memory=memory, labels=batch["labels"])
        logp = model.token_log_probs(memory, batch["input_ids"], batch["attention_mask"])
        trained = batch["labels"][:, 1:] != -100
        assert int(trained.sum()) == sum(len(tok.encode(c)) - 1 for c in captions)  # caption words + EOS
        torch.testing.assert_close(loss, -(logp * trained).sum() / trained.sum())
        # another prompt token in the same place changes the loss only through what follows it:
        # the prompt's own targets are masked, so the positions whose loss counts are the same
        other = batch["input_ids"].clone()
        other[0, 2] = tok.hf.convert_tokens_to_ids("star")
        changed = model(None, other, batch["attention_mask"], memory=memory, labels=batch["labels"])
        logp_other = model.token_log_probs(memory, other, batch["attention_mask"])
        torch.testing.assert_close(changed, -(logp_other * trained).sum() / trained.sum())
        # unprompted labels would have trained the prompt too
        unmasked = model(None, batch["input_ids"], batch["attention_mask"], memory=memory)
        assert not torch.isclose(unmasked, loss)


# ---------------------------------------------------------------- shards


SHARD_PROMPTS = ["a photo of", "there is", "a small drawing showing"]


def prompted_shards(tmp_path, n: int = 8, per_shard: int = 4):
    """Shards whose even samples have a json `prompt`; returns (pattern, {key: prompt or None})."""
    from helpers import tiny_image_bytes

    from mmcap.data.shards import Sample, write_shards

    samples = [Sample(key=f"s{i:03d}", image=tiny_image_bytes(i), captions=[CAPTIONS[i % 4]],
                      meta={"prompt": SHARD_PROMPTS[i // 2 % 3]} if i % 2 == 0 else {}) for i in range(n)]
    write_shards(samples, str(tmp_path / "train-%06d.tar"), maxcount=per_shard, progress=False)
    return str(tmp_path / "train-*.tar"), {s.key: s.meta.get("prompt") for s in samples}


def test_json_prompt_is_read_and_checked():
    from mmcap.data.samples import read_prompt

    assert read_prompt({"json": json.dumps({"captions": ["x"], "prompt": "  a   photo of "}).encode()}) == "a photo of"
    for raw in ({"json": b'{"captions": ["x"], "prompt": 3}'}, {"json": b'{"prompt": "  "}'}, {"json": b"{bad"},
                {"txt": b"x"}):
        assert read_prompt(raw) is None


def test_shard_prompts_reach_the_batch_masked(tmp_path):
    from mmcap.data import CaptionDataModule

    pattern, prompts = prompted_shards(tmp_path)
    tok = model_of("gpt2", sharp=False).tokenizer
    dm = CaptionDataModule(train_shards=pattern, val_shards=pattern, image_size=16, batch_size=8, num_workers=0,
                           shuffle_buffer=1)
    dm.setup("fit")
    assert sorted(dm.train_captions()) == sorted(CAPTIONS * 2 + [p for p in prompts.values() if p])
    dm.set_tokenizer(tok)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert batch["prompts"] == [prompts[k] for k in batch["keys"]]
        expected = tok(batch["captions"], dm.max_caption_tokens, prompts=batch["prompts"])
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[name], expected[name])
        for i, prompt in enumerate(batch["prompts"]):
            head = 1 + len(tok.prompt_ids(prompt))
            assert batch["input_ids"][i, 1:head].tolist() == tok.prompt_ids(prompt)
            assert (batch["labels"][i, :head] == -100).all() and (batch["labels"][i, head] != -100)


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("kind", ["gpt2", "llama-prefix", "llama-xattn"])
def test_training_on_prompted_captions_lowers_the_loss(kind):
    model = model_of(kind, sharp=False).train()
    pixels, _ = model.preprocess(circle_images())
    batch = model.tokenizer(CAPTIONS, prompts=PROMPTS)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(pixels, batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_fit_on_prompted_shards_learns_and_validates_with_prompts(tmp_path, monkeypatch):
    """The whole path: json prompts in shards, CaptionModule trains with the prompt masked and
    validates by continuing each sample's prompt."""
    import lightning as L
    from helpers import module_args

    import mmcap.training.module as module_mod
    from mmcap.data import CaptionDataModule
    from mmcap.metrics import exact_match_rate
    from mmcap.training import CaptionModule

    monkeypatch.setattr(module_mod, "evaluate_captions", lambda refs, preds, meteor=True: {
        "BLEU-4": exact_match_rate(refs, preds), "exact_match": exact_match_rate(refs, preds)})
    pattern, _ = prompted_shards(tmp_path)
    seen, original = [], CaptionModule.generate_captions

    def recording(self, pixels, memory=None, generation=None, prompts=None):
        seen.append(prompts)
        return original(self, pixels, memory, generation, prompts)

    monkeypatch.setattr(CaptionModule, "generate_captions", recording)
    cfg = tiny_config()
    torch.manual_seed(0)
    module = CaptionModule(**module_args(**cfg, lr=1e-2, warmup_steps=2, generation={"max_new_tokens": 6}))
    dm = CaptionDataModule(train_shards=pattern, val_shards=pattern, image_size=64, batch_size=8, num_workers=0,
                           shuffle_buffer=1, max_caption_tokens=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=25, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=25, check_val_every_n_epoch=None,
                        default_root_dir=str(tmp_path))
    first = {}

    class FirstLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            first.setdefault("loss", float(outputs["loss"]))
            first["last"] = float(outputs["loss"])
            tok = pl_module.captioner.tokenizer
            assert torch.equal(batch["labels"], tok(batch["captions"], 16, prompts=batch["prompts"])["labels"])

    trainer.callbacks.append(FirstLoss())
    trainer.fit(module, dm)
    assert first["last"] < 0.5 * first["loss"], first
    assert seen == [[SHARD_PROMPTS[i // 2 % 3] if i % 2 == 0 else None for i in range(8)]]


# ---------------------------------------------------------------- CLI and service


def test_caption_cli_prompt(tmp_path, image_files, capsys):
    from mmcap.inference.cli import caption_main

    model = model_of("gpt2")
    model.save_pretrained(tmp_path / "model")
    files = [str(p) for p in image_files[:2]]
    assert caption_main(["--model", str(tmp_path / "model"), "--num-workers", "0", "--max-new-tokens", "8",
                         "--prompt", "a photo of", *files]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert printed == [[f, c] for f, c in zip(files, model.caption(files, prompt="a photo of", max_new_tokens=8))]


def test_service_takes_a_prompt_per_request(image_files):
    from starlette.testclient import TestClient

    from mmcap.serve.app import create_app

    model = model_of("gpt2")
    expected = model.caption([str(p) for p in image_files[:2]], prompt=["a photo of", None], max_new_tokens=8)
    with TestClient(create_app(model)) as client:
        def post(path, **fields):
            with open(path, "rb") as f:
                return client.post("/caption", files={"image": f}, data={"max_new_tokens": "8", **fields})

        assert post(image_files[0], prompt="a photo of").json()["caption"] == expected[0]
        assert post(image_files[1]).json()["caption"] == expected[1]
        too_long = post(image_files[0], prompt="there is " * 20)
        assert too_long.status_code == 422 and too_long.json()["error"] == "invalid_option"
        assert "prompt" in client.get("/openapi.json").text


def test_predict_captions_each_shard_sample_from_its_prompt(tmp_path):
    """`mmcap predict` (CaptionModule.predict_step over predict_shards): a sample whose json has a
    `prompt` is captioned from it, as `Captioner.caption(image, prompt=...)` would; the others from BOS."""
    from helpers import module_args

    from mmcap.data import CaptionDataModule
    from mmcap.training import CaptionModule

    pattern, prompts = prompted_shards(tmp_path)
    torch.manual_seed(0)
    module = CaptionModule(**module_args(**tiny_config(), generation={"max_new_tokens": 6, "num_beams": 2})).eval()
    module.set_captioner(model_of("gpt2"))  # sharpened: captions that depend on the prompt
    dm = CaptionDataModule(predict_shards=pattern, image_size=tiny_config()["image_size"], eval_batch_size=8, num_workers=0)
    records, seen = [], 0
    for batch in dm.predict_dataloader():
        assert batch["prompts"] == [prompts[k] for k in batch["keys"]]
        with torch.no_grad():
            records += module.predict_step(batch, 0)
        for i, key in enumerate(batch["keys"]):
            alone = module.captioner.caption(batch["pixels"][i], prompt=prompts[key], max_new_tokens=6, num_beams=2)
            assert records[seen + i]["image"] == key and records[seen + i]["caption"] == alone
        seen += len(batch["keys"])
    assert seen == len(prompts) == 8
    with_prompt = {r["caption"] for r in records if prompts[r["image"]]}
    assert len(with_prompt) > 1  # the prompts steer the captions


def test_one_image_tensor_is_one_image_with_its_prompt():
    """A [3, H, W] tensor is one image for `caption` and `score`, prompt and all (not three channels)."""
    model = model_of("gpt2")
    pixels, _ = model.preprocess(circle_images()[:2])
    one = model.caption(pixels[1], prompt="there is", max_new_tokens=6)
    assert isinstance(one, str) and one == model.caption(pixels, prompt="there is", max_new_tokens=6)[1]
    both = model.score(pixels, [one, one], prompt="there is")
    assert torch.allclose(model.score(pixels[1], one, prompt="there is"), both[1])


@pytest.mark.parametrize("kind", ["gpt2", "llama-prefix"])
def test_scst_samples_continue_the_prompt_and_score_the_continuation(kind, monkeypatch):
    """SCST with prompts: captions are sampled from `BOS prompt` through the model's own fusion, and
    the teacher-forced log-probability the loss weighs is the sampled continuation's, the same
    number sampling computed (the prompt in the context, its tokens not counted)."""
    import mmcap.training.scst as scst

    model = model_of(kind)
    memory = image_tokens(4)
    k = 3
    sampled, teacher = {}, {}
    original_generate, original_logp = scst.generate, model.token_log_probs

    def recording_generate(*args, **kwargs):
        out = original_generate(*args, **kwargs)
        sampled.setdefault("out", out)
        sampled.setdefault("prompts", kwargs["prompts"])
        assert kwargs["fusion"] is model.fusion
        return out

    def recording_logp(*args, **kwargs):
        teacher["logp"] = original_logp(*args, **kwargs)
        return teacher["logp"]

    monkeypatch.setattr(scst, "generate", recording_generate)
    monkeypatch.setattr(model, "token_log_probs", recording_logp)
    cfg = scst.SCSTConfig(num_samples=k, sampling={"max_new_tokens": 6})
    scorer = scst.reward_scorer([[c] for c in CAPTIONS])
    torch.manual_seed(0)
    loss, _ = scst.self_critical_loss(model, None, [[c] for c in CAPTIONS], scorer, cfg, memory=memory, prompts=PROMPTS)
    assert sampled["prompts"] == [model.tokenizer.prompt_ids(p) for p in PROMPTS for _ in range(k)]
    assert torch.allclose(teacher["logp"].sum(1), sampled["out"].scores, atol=1e-4)
    assert torch.isfinite(loss)
