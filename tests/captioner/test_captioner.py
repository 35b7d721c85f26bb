"""The Captioner contract: shapes, learning, the caption/score API, save/load, the CLI."""
import json
import subprocess
import sys

import pytest
import torch
from helpers import CAPTIONS, circle_images, tiny_config
from PIL import Image

from mmcap import Captioner, CaptionerConfig
from mmcap.images import ImageError

pytestmark = pytest.mark.usefixtures("one_thread")


def scenes():
    return circle_images((64, 64), left=4)


def overfit(model, images, captions, steps=120):
    pixels, _ = model.preprocess(images)
    batch = model.tokenizer(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(pixels, **batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 9 and model.eval().caption(images) == captions:
            break
        model.train()
    return losses


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_shapes(family):
    torch.manual_seed(0)
    model = Captioner.from_config(tiny_config(family), captions=CAPTIONS).eval()
    pixels = torch.randn(3, 3, 64, 64)
    assert model.encoder(pixels).shape == (3, 512, 2, 2)
    assert model.encode(pixels).shape == (3, 4, 32)
    assert model.encode(torch.randn(1, 3, 96, 128)).shape == (1, 12, 32)  # 3x4 grid
    batch = model.tokenizer(CAPTIONS[:3])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 9)  # BOS + 7 words + EOS
    loss = model(pixels, **batch)
    assert loss.shape == () and torch.isfinite(loss)
    assert model.token_log_probs(model.encode(pixels), **batch).shape == (3, 8)


def test_resnet50_grid_is_7x7x2048_at_224():
    cfg = tiny_config("gpt2", encoder={"arch": "resnet50"})
    model = Captioner.from_config(cfg, captions=CAPTIONS).eval()
    with torch.no_grad():
        assert model.encoder(torch.randn(1, 3, 224, 224)).shape == (1, 2048, 7, 7)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_overfits_four_pairs_exactly(family):
    torch.manual_seed(0)
    cfg = tiny_config(family)
    cfg["decoder"]["hidden_size"] = 64
    model = Captioner.from_config(cfg, captions=CAPTIONS)
    images = scenes()
    losses = overfit(model, images, CAPTIONS)
    assert losses[-1] < 0.5 * losses[0]
    assert model.eval().caption(images) == CAPTIONS
    assert model.caption(images, num_beams=3) == CAPTIONS
    assert model.caption(images[2]) == CAPTIONS[2]  # one image in, one str out


def test_caption_inputs_scores_and_attention(tiny_gpt2, image_files):
    paths = [str(p) for p in image_files]
    by_path = tiny_gpt2.caption(paths, max_new_tokens=5)
    by_pil = tiny_gpt2.caption([Image.open(p) for p in paths], max_new_tokens=5)
    pixels, _ = tiny_gpt2.preprocess(paths)
    by_tensor = tiny_gpt2.caption(pixels, max_new_tokens=5, batch_size=3)
    assert by_path == by_pil == by_tensor and len(by_path) == 4
    caps, scores, att = tiny_gpt2.caption(paths, max_new_tokens=5, return_scores=True, return_attention=True)
    out = tiny_gpt2.generate(pixels, max_new_tokens=5)
    assert scores.shape == (4,)
    for n, a in zip(out.lengths.tolist(), att):  # one (H, W) map per generated token
        assert a.shape == (n, 2, 2)
        torch.testing.assert_close(a.sum((1, 2)), torch.ones(n), atol=1e-4, rtol=0)
    # the reported score is the model's log-likelihood of that caption
    ids = torch.cat([torch.full((4, 1), tiny_gpt2.tokenizer.bos_id), out.sequences], 1)
    mask = (torch.arange(ids.shape[1])[None] <= out.lengths[:, None]).long()
    direct = tiny_gpt2.token_log_probs(tiny_gpt2.encode(pixels), ids, mask).sum(1)
    torch.testing.assert_close(direct, scores, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_score_ranks_true_caption_first():
    torch.manual_seed(0)
    cfg = tiny_config("gpt2")
    cfg["decoder"]["hidden_size"] = 64
    model = Captioner.from_config(cfg, captions=CAPTIONS)
    images = scenes()
    overfit(model, images, CAPTIONS)
    model.eval()
    for i, im in enumerate(images):
        s = model.score([im] * 4, CAPTIONS)
        assert s.shape == (4,) and int(s.argmax()) == i
    assert model.score(images[0], CAPTIONS[0]).dim() == 0


def test_save_load_round_trip(tiny_gpt2, image_files, tmp_path):
    tiny_gpt2.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".tmp")]
    loaded = Captioner.from_pretrained(tmp_path / "m")
    for kw in ({}, {"num_beams": 3}):
        a, sa = tiny_gpt2.caption(image_files, max_new_tokens=6, return_scores=True, **kw)
        b, sb = loaded.caption(image_files, max_new_tokens=6, return_scores=True, **kw)
        assert a == b and torch.equal(sa, sb)
    caps = ["a red circle"] * 4
    assert torch.equal(tiny_gpt2.score(image_files, caps), loaded.score(image_files, caps))
    assert loaded.config == tiny_gpt2.config


def test_bert_round_trip(tiny_bert, image_files, tmp_path):
    tiny_bert.save_pretrained(tmp_path / "b")
    loaded = Captioner.from_pretrained(tmp_path / "b")
    assert tiny_bert.caption(image_files, max_new_tokens=6) == loaded.caption(image_files, max_new_tokens=6)


def test_broken_model_directories_give_clear_errors(tiny_gpt2, tmp_path):
    good = tmp_path / "m"
    tiny_gpt2.save_pretrained(good)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        bad = tmp_path / "nomodel"
        bad.mkdir()
        (bad / "config.json").write_text((good / "config.json").read_text())
        Captioner.from_pretrained(bad)
    (good / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        Captioner.from_pretrained(good)
    tiny_gpt2.save_pretrained(good)
    (good / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        Captioner.from_pretrained(good)


def test_loading_reads_no_pickle(tiny_gpt2, tmp_path):
    """A pickle planted in the model directory is never opened."""
    tiny_gpt2.save_pretrained(tmp_path / "m")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (tmp_path / "m" / name).write_bytes(pickle.dumps(Payload()))
    Captioner.from_pretrained(tmp_path / "m")
    assert not marker.exists()


def test_from_config_yaml_and_errors(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("encoder: {arch: resnet18}\ndecoder: {family: bert, hidden_size: 32, num_layers: 1, num_heads: 2}\n")
    model = Captioner.from_config(path, captions=CAPTIONS)
    assert model.config.decoder.family == "bert" and model.decoder.config.num_hidden_layers == 1
    recipe = tmp_path / "recipe.yaml"  # a training recipe is not a model preset: a clear error
    recipe.write_text("model:\n  captioner: {encoder: {arch: resnet18}}\n")
    with pytest.raises(ValueError, match=r"recipe.yaml: unknown captioner config keys: \['model'\]"):
        CaptionerConfig.load(recipe)
    with pytest.raises(ValueError, match="tokenizer"):
        Captioner.from_config(tiny_config())
    with pytest.raises(ValueError, match="arch"):
        CaptionerConfig.from_dict({"encoder": {"arch": "resnet9"}})
    with pytest.raises(ValueError, match="hidden"):
        CaptionerConfig.from_dict({"decoder": {"hiddensize": 3}})


def test_encoder_freeze_keeps_batchnorm_in_eval(tiny_gpt2):
    enc = tiny_gpt2.encoder
    enc.set_freeze("layer2")
    tiny_gpt2.train()
    assert not any(p.requires_grad for p in enc.layer2.parameters())
    assert all(p.requires_grad for p in enc.layer3.parameters())
    assert not enc.layer1[0].bn1.training and enc.layer3[0].bn1.training
    enc.set_freeze("none")
    assert enc.layer1[0].bn1.training


def test_encoder_weights_from_local_state_dict(tmp_path):
    import torchvision

    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = Captioner.from_config(tiny_config(encoder={"arch": "resnet18", "weights": str(tmp_path / "r18.pth")}), captions=CAPTIONS)
    assert torch.equal(model.encoder.stem[0].weight, net.conv1.weight)
    with pytest.raises(ValueError, match="IMAGENET"):
        Captioner.from_config(tiny_config(encoder={"arch": "resnet18", "weights": "NOT_A_WEIGHT"}), captions=CAPTIONS)


@pytest.mark.slow
def test_pretrained_minilm_decoder_trains_and_generates(minilm_dir, image_files):
    """A real pretrained BERT-family checkpoint: only cross-attention and projection are new."""
    from transformers import BertModel

    torch.manual_seed(0)
    cfg = tiny_config("bert", decoder={"family": "bert", "pretrained": minilm_dir})
    model = Captioner.from_config(cfg)
    ref = BertModel.from_pretrained(minilm_dir)
    assert torch.equal(model.decoder.bert.encoder.layer[0].attention.self.query.weight,
                       ref.encoder.layer[0].attention.self.query.weight)
    assert model.tokenizer.bos_id == model.tokenizer.hf.cls_token_id
    images = scenes()
    pixels, _ = model.preprocess(images)
    batch = model.tokenizer(CAPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    first = model(pixels, **batch)
    first.backward()
    opt.step()
    opt.zero_grad()
    for _ in range(4):
        loss = model(pixels, **batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first.item()
    caps = model.eval().caption(image_files, max_new_tokens=4, num_beams=2)
    assert len(caps) == 4 and all(isinstance(c, str) for c in caps)


def test_caption_errors_name_the_file(tiny_gpt2, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        tiny_gpt2.caption(str(bad))


@pytest.mark.slow
def test_cli_caption(tiny_gpt2, image_files, tmp_path):
    tiny_gpt2.save_pretrained(tmp_path / "m")
    bad = tmp_path / "imgs" / "zzz_broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"")
    for p in image_files:
        (tmp_path / "imgs" / p.name).write_bytes(p.read_bytes())
    cmd = [sys.executable, "-m", "mmcap.cli", "caption", "--model", str(tmp_path / "m"), "--format", "jsonl",
           "--max-new-tokens", "5", "--num-beams", "2", str(tmp_path / "imgs")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "zzz_broken.png" in res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r for r in rows if "error" in r] == [{"image": str(bad), "error": "empty_file"}]
    rows = [r for r in rows if "error" not in r]
    assert [r["image"].split("/")[-1] for r in rows] == sorted(p.name for p in image_files)
    expected = tiny_gpt2.caption(sorted(str(tmp_path / "imgs" / p.name) for p in image_files), max_new_tokens=5, num_beams=2)
    assert [r["caption"] for r in rows] == expected


def _config_files():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    return sorted(root.glob("model/*.yaml")) + sorted(p for p in root.glob("*.yaml") if "scst" not in p.name)


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_from_config_builds_every_architecture(path):
    """Every model preset and recipe builds (pretrained weights off: nothing can be downloaded)."""
    cfg = CaptionerConfig.load(path) if path.parent.name == "model" else CaptionerConfig.from_recipe(path)
    expected_arch, expected_family = cfg.encoder.arch, cfg.decoder.family
    cfg.encoder.weights, cfg.decoder.pretrained = None, None
    cfg.decoder.hidden_size, cfg.decoder.num_layers, cfg.decoder.num_heads = 32, 1, 2
    model = Captioner.from_config(cfg, captions=CAPTIONS).eval()
    assert model.encoder.out_channels == (512 if expected_arch in ("resnet18", "resnet34") else 2048)
    assert model.decoder.config.model_type == expected_family
    with torch.no_grad():
        assert model.encode(torch.randn(1, 3, 64, 64)).shape == (1, 4, 32)
