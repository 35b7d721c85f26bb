"""`mmcap features`: frozen-encoder grids precomputed into shards, and training from them.

The claim under test: training from features gives the same model as training from images with
the same encoder frozen and the same (evaluation) view of each image, and the model it exports
captions images."""
import io
import json

import lightning as L
import numpy as np
import pytest
import torch
from helpers import CAPTIONS, module_args, tiny_config

from mmcap import Captioner
from mmcap.cli import main as mmcap_main
from mmcap.data.datamodule import CaptionDataModule
from mmcap.data.samples import Collate, SkipCounter
from mmcap.data.streams import iter_samples
from mmcap.data.shards import FEATURE_MEMBER, read_members, write_member_shards
from mmcap.data.samples import features_from_bytes, features_to_bytes
from mmcap.training.features import load_encoder, load_info
from mmcap.training import CaptionModule


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def saved_model(tmp_path, make_caption_shards):
    """A tiny model (64 px) saved to disk, with its tokenizer trained on the shards' captions."""
    pattern, captions = make_caption_shards(n_shards=2, per_shard=4)
    torch.manual_seed(0)
    model = Captioner.from_config(tiny_config(), captions=[c for cs in captions.values() for c in cs])
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model", pattern, captions


def extract(model_dir, pattern, out, split="train", *extra):
    code = mmcap_main(["features", "--model", str(model_dir), "--data", pattern, "--out", str(out),
                       "--split", split, "--maxcount", "4", "--batch-size", "3", "--quiet", *extra])
    assert code == 0


def test_npy_round_trip_and_bad_bytes():
    grid = torch.randn(8, 2, 3)
    assert torch.equal(features_from_bytes(features_to_bytes(grid)), grid)
    assert torch.equal(features_from_bytes(features_to_bytes(grid.half())), grid.half().float())
    assert torch.equal(features_from_bytes(features_to_bytes(grid.bfloat16())), grid.bfloat16().float())
    with pytest.raises(ValueError, match="sample7: unreadable"):
        features_from_bytes(b"\x93NUMPY garbage", "sample7")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle payload
    with pytest.raises(ValueError, match="sample8: unreadable"):
        features_from_bytes(buf.getvalue(), "sample8")
    with pytest.raises(ValueError, match=r"x: features must be a grid \[C, h, w\]"):
        features_from_bytes(features_to_bytes(torch.zeros(3, 4)), "x")


def test_extracted_features_equal_the_encoder_on_the_eval_view(tmp_path, saved_model):
    model_dir, pattern, captions = saved_model
    extract(model_dir, pattern, tmp_path / "feats")
    info = load_info(tmp_path / "feats")
    assert (info.encoder.arch, info.image_size, info.channels, info.grid) == ("resnet18", 64, 512, (2, 2))
    model = Captioner.from_pretrained(model_dir)
    encoder, _ = load_encoder(tmp_path / "feats")
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), model.encoder.state_dict().values()))
    index = json.loads((tmp_path / "feats" / "shards.json").read_text())["shards"]
    assert {k: v["samples"] for k, v in index.items()} == {"train-000000.tar": 4, "train-000001.tar": 4}
    seen = {}
    for ex in iter_samples(str(tmp_path / "feats" / "train-*.tar")):
        assert ex.image is None and ex.features.shape == (512, 2, 2)
        seen[ex.key] = ex
    assert list(seen) == list(captions)  # same keys, same order
    originals = {ex.key: ex for ex in iter_samples(pattern)}
    with torch.no_grad():
        for key, ex in seen.items():
            assert ex.captions == captions[key]
            pixels, _ = model.preprocess(originals[key].image)
            torch.testing.assert_close(ex.features, model.encoder(pixels)[0], rtol=1e-5, atol=1e-5)


def test_half_precision_storage_and_corrupt_samples_are_counted(tmp_path, saved_model, tiny_image, capsys):
    model_dir, pattern, _ = saved_model
    bad = str(tmp_path / "bad" / "train-%06d.tar")
    write_member_shards([("ok", {"jpg": tiny_image(1), "txt": b"a red circle"}),
                         ("broken", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a blue square"}),
                         ("nocap", {"jpg": tiny_image(2)})], bad, progress=False)
    extract(model_dir, str(tmp_path / "bad" / "train-*.tar"), tmp_path / "feats", "train", "--dtype", "float16")
    out = capsys.readouterr().out
    assert "1 samples in 1 shards" in out and "missing_caption=1" in out and "unreadable_image=1" in out
    (name, data), = [(n, d) for n, d in read_members(str(tmp_path / "feats" / "train-000000.tar")) if n.endswith(FEATURE_MEMBER)]
    assert np.load(io.BytesIO(data), allow_pickle=False).dtype == np.float16
    # a second split must come from the same encoder and settings
    torch.manual_seed(1)
    other = Captioner.from_config(tiny_config(), captions=CAPTIONS)
    other.save_pretrained(tmp_path / "other")
    code = mmcap_main(["features", "--model", str(tmp_path / "other"), "--data", pattern, "--out",
                       str(tmp_path / "feats"), "--split", "val", "--dtype", "float16", "--quiet"])
    assert code == 1 and "another encoder" in capsys.readouterr().err


def test_batches_never_mix_images_and_features():
    collate = Collate(SkipCounter(), 64)
    item = {"caption": "a", "references": ["a"], "key": "k"}
    batch = collate([{"features": torch.zeros(4, 2, 2), **item}, {"features": torch.ones(4, 2, 2), **item}])
    assert batch["features"].shape == (2, 4, 2, 2) and "pixels" not in batch
    with pytest.raises(ValueError, match="mixes image and features"):
        collate([{"features": torch.zeros(4, 2, 2), **item}, {"pixels": torch.zeros(3, 64, 64), **item}])


class LossLog(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(model_dir, tmp_path, name, steps=6, **data_kw):
    """Fine-tune `model_dir` for `steps` fp32 steps with the encoder frozen throughout."""
    torch.manual_seed(0)
    module = CaptionModule(**module_args(**tiny_config(), lr=3e-3, warmup_steps=1, init_from=str(model_dir),
                                       freeze_encoder_steps=10**6, generation={"num_beams": 1, "max_new_tokens": 8}))
    data = CaptionDataModule(image_size=64, batch_size=3, num_workers=0, shuffle_buffer=5, seed=0,
                             max_caption_tokens=16, **data_kw)
    log = LossLog()
    L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[log],
              default_root_dir=str(tmp_path / name)).fit(module, datamodule=data)
    return module, log.losses


def test_training_from_features_equals_frozen_encoder_on_images(tmp_path, saved_model):
    model_dir, pattern, _ = saved_model
    extract(model_dir, pattern, tmp_path / "feats")
    from_images, image_losses = fit(model_dir, tmp_path, "images", train_shards=pattern, augment=False)
    from_feats, feat_losses = fit(model_dir, tmp_path, "feats", features_dir=str(tmp_path / "feats"))

    assert len(image_losses) == len(feat_losses) == 6
    np.testing.assert_allclose(feat_losses, image_losses, rtol=1e-4, atol=1e-5)
    assert feat_losses[-1] < feat_losses[0]
    a, b = from_images.captioner.state_dict(), from_feats.captioner.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    # the encoder never moved, and the model trained from features captions images
    source = Captioner.from_pretrained(model_dir)
    assert all(torch.equal(x, y) for x, y in zip(source.encoder.state_dict().values(),
                                                  from_feats.captioner.encoder.state_dict().values()))
    model = from_feats.captioner.eval()
    assert model.config.encoder.freeze == "all"
    examples = list(iter_samples(str(tmp_path / "feats" / "train-*.tar")))
    originals = {ex.key: ex.image for ex in iter_samples(pattern)}
    pixels, _ = model.preprocess([originals[ex.key] for ex in examples])
    with torch.no_grad():
        from_pixels = model.generate(pixels, max_new_tokens=8)
        from_memory = model.generate(None, memory=model.project(torch.stack([ex.features for ex in examples])),
                                     max_new_tokens=8)
    assert torch.equal(from_pixels.sequences, from_memory.sequences)


def test_encoder_mismatch_and_missing_features_dir_are_clear_errors(tmp_path, saved_model):
    model_dir, pattern, _ = saved_model
    extract(model_dir, pattern, tmp_path / "feats")
    torch.manual_seed(0)
    module = CaptionModule(**module_args(**tiny_config(encoder={"arch": "resnet34"}), warmup_steps=1))
    data = CaptionDataModule(features_dir=str(tmp_path / "feats"), image_size=64, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="resnet18 features but model.captioner.encoder.arch is resnet34"):
        trainer.fit(module, datamodule=data)
    # feature shards given as plain train_shards, without features_dir: refused, not trained on
    module = CaptionModule(**module_args(**tiny_config(), warmup_steps=1))
    data = CaptionDataModule(train_shards=str(tmp_path / "feats" / "train-*.tar"), image_size=64, batch_size=4,
                             num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="set data.features_dir"):
        trainer.fit(module, datamodule=data)


def test_features_dir_with_image_shards_is_refused(tmp_path, saved_model):
    """features_dir set, but train_shards overridden with the image shards: an error, not a silent
    run from images."""
    model_dir, pattern, _ = saved_model
    extract(model_dir, pattern, tmp_path / "feats")
    module = CaptionModule(**module_args(**tiny_config(), warmup_steps=1))
    data = CaptionDataModule(features_dir=str(tmp_path / "feats"), train_shards=pattern, image_size=64,
                             batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="this batch holds images"):
        trainer.fit(module, datamodule=data)


def test_bf16_extraction_is_close_to_fp32(tmp_path, saved_model):
    model_dir, pattern, _ = saved_model
    extract(model_dir, pattern, tmp_path / "fp32")
    extract(model_dir, pattern, tmp_path / "bf16", "train", "--precision", "bf16")
    full = {ex.key: ex.features for ex in iter_samples(str(tmp_path / "fp32" / "train-*.tar"))}
    half = {ex.key: ex.features for ex in iter_samples(str(tmp_path / "bf16" / "train-*.tar"))}
    assert full.keys() == half.keys()
    for key in full:
        assert not torch.equal(full[key], half[key])  # really computed in bf16
        cosine = torch.nn.functional.cosine_similarity(full[key].flatten(), half[key].flatten(), dim=0)
        assert cosine > 0.99, (key, float(cosine))
