"""The configuration surface: presets, recipes, inputs never mutated, generation defaults saved
with the model, old model directories loading unchanged, inference without Lightning."""
import dataclasses
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import circle_images, tiny_config

from mmcap import Captioner, CaptionerConfig
from mmcap.generation.config import GenerationConfig, add_generation_arguments, generation_overrides

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_saved_by_mmcap_0_1_loads_and_captions_unchanged(tmp_path):
    """tests/fixtures/model_v0_1 was written by mmcap 0.1's save_pretrained (resolved decoder
    config under decoder.hf_config, no generation_config.json); its outputs were recorded then."""
    with tarfile.open(FIXTURES / "model_v0_1.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    expected = json.loads((FIXTURES / "model_v0_1.expected.json").read_text())
    saved = json.loads((tmp_path / "model_v0_1" / "config.json").read_text())
    assert saved["mmcap_version"] == "0.1.0" and "hf_config" in saved["decoder"]
    model = Captioner.from_pretrained(tmp_path / "model_v0_1")
    images = circle_images()  # as the fixture's recorded outputs were made
    captions, scores = model.caption(images, return_scores=True, max_new_tokens=8, min_new_tokens=4)
    assert captions == expected["greedy"]
    torch.testing.assert_close(scores, torch.tensor(expected["greedy_log_probs"]), rtol=1e-5, atol=1e-5)
    assert model.caption(images, num_beams=3, max_new_tokens=8, min_new_tokens=4) == expected["beam3"]
    torch.testing.assert_close(model.score(images, expected["score_captions"]), torch.tensor(expected["score"]),
                               rtol=1e-5, atol=1e-5)
    pixels, _ = model.preprocess(images)
    out = model.generate(pixels, max_new_tokens=8, num_beams=2)
    assert [out.sequences[i, : out.lengths[i]].tolist() for i in range(4)] == expected["beam2_ids"]
    # re-saved in the current layout, it loads to the same model
    model.save_pretrained(tmp_path / "resaved")
    again = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "hf_config" not in again["decoder"] and again["resolved"]["decoder"]["n_layer"] == 2
    assert Captioner.from_pretrained(tmp_path / "resaved").caption(images, num_beams=3, max_new_tokens=8,
                                                                   min_new_tokens=4) == expected["beam3"]


def test_model_saved_by_mmcap_0_2_loads_and_captions_unchanged(tmp_path):
    """tests/fixtures/model_v0_2 was written by mmcap 0.2.0 (`tests/fixtures/make_model_v0_2.py`), a
    trained tiny model whose captions are words; fp32 outputs must stay exactly as recorded then."""
    with tarfile.open(FIXTURES / "model_v0_2.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    expected = json.loads((FIXTURES / "model_v0_2.expected.json").read_text())
    model = Captioner.from_pretrained(tmp_path / "model_v0_2")
    images = circle_images()
    captions, scores = model.caption(images, return_scores=True, max_new_tokens=8)
    assert captions == expected["greedy"] == expected["score_captions"]
    torch.testing.assert_close(scores, torch.tensor(expected["greedy_log_probs"]), rtol=1e-5, atol=1e-5)
    beam3, beam3_scores = model.caption(images, return_scores=True, num_beams=3, max_new_tokens=8)
    assert beam3 == expected["beam3"]
    torch.testing.assert_close(beam3_scores, torch.tensor(expected["beam3_log_probs"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.score(images, expected["score_captions"]), torch.tensor(expected["score"]),
                               rtol=1e-5, atol=1e-5)
    pixels, _ = model.preprocess(images)
    out = model.generate(pixels, max_new_tokens=8, num_beams=2)
    assert [out.sequences[i, : out.lengths[i]].tolist() for i in range(4)] == expected["beam2_ids"]


@pytest.mark.slow
def test_building_never_writes_into_the_config(minilm_dir):
    cfg = CaptionerConfig.from_dict({**tiny_config("bert"), "decoder": {"family": "bert", "pretrained": minilm_dir}})
    before = dataclasses.asdict(cfg)
    first = Captioner.from_config(cfg)
    assert dataclasses.asdict(cfg) == before
    second = Captioner.from_config(cfg)  # 0.1 silently skipped the pretrained weights here
    pretrained = 0
    for (name, a), (_, b) in zip(first.decoder.named_parameters(), second.decoder.named_parameters()):
        if name.startswith("bert.") and "crossattention" not in name:  # what the checkpoint holds
            torch.testing.assert_close(a, b, msg=name)
            pretrained += 1
    assert pretrained > 50
    assert first.decoder.config.vocab_size == 30522  # resolved: on the model, not in cfg


def test_generation_defaults_saved_with_the_model(tmp_path, tiny_gpt2, image_files):
    tiny_gpt2.generation_config = GenerationConfig(num_beams=3, max_new_tokens=5, no_repeat_ngram_size=2)
    tiny_gpt2.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert saved["num_beams"] == 3 and saved["max_new_tokens"] == 5
    model = Captioner.from_pretrained(tmp_path / "m")
    assert model.generation_config == tiny_gpt2.generation_config
    explicit = model.caption(image_files, num_beams=3, max_new_tokens=5, no_repeat_ngram_size=2)
    assert model.caption(image_files) == explicit
    assert model.generation_options(num_beams=1).num_beams == 1  # a call overrides the defaults
    assert GenerationConfig().resolved(24).max_new_tokens == 24  # unset: the model's caption length


def test_generation_cli_options_derive_from_the_config():
    import argparse

    p = argparse.ArgumentParser()
    add_generation_arguments(p)
    fields = {f.name for f in dataclasses.fields(GenerationConfig)} - {"use_cache"}
    assert {a.dest for a in p._actions if a.dest != "help"} == fields
    args = p.parse_args(["--num-beams", "4", "--early_stopping", "never", "--do-sample"])
    assert generation_overrides(args) == {"num_beams": 4, "early_stopping": "never", "do_sample": True}
    assert generation_overrides(p.parse_args([])) == {}
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(num_beams=0)
    with pytest.raises(TypeError, match="num_beam"):
        GenerationConfig.from_kwargs(num_beam=3)


def test_recipe_model_blocks_resolve_to_presets():
    """Recipes point at presets; CaptionerConfig.from_recipe reads what `mmcap fit` would build."""
    cfg = CaptionerConfig.from_recipe(ROOT / "configs" / "demo.yaml")
    assert cfg == CaptionerConfig.load(ROOT / "configs" / "model" / "demo_gpt2.yaml")
    coco = CaptionerConfig.from_recipe(ROOT / "configs" / "coco_resnet50_gpt2.yaml")
    assert coco.decoder.pretrained == "gpt2" and coco.encoder.arch == "resnet50" and coco.image_size == 224


INFERENCE_WITHOUT_LIGHTNING = r"""
import sys
from mmcap import Captioner
from mmcap.cli import main
model = Captioner.from_pretrained(sys.argv[1])
model.caption(sys.argv[2], max_new_tokens=3)
assert len(list(model.caption_stream([sys.argv[2], sys.argv[3]], num_workers=1, max_new_tokens=3))) == 3
assert main(["caption", "--model", sys.argv[1], "--max-new-tokens", "3", sys.argv[2]]) == 0
assert main(["eval", "--model", sys.argv[1], "--data", sys.argv[3], "--no-meteor", "--max-new-tokens", "3"]) == 0
from mmcap.serve.app import create_app
create_app(model)
loaded = sorted(m for m in sys.modules if m == "lightning" or m.startswith(("lightning.", "pytorch_lightning")))
print("LOADED", loaded)
"""


@pytest.mark.slow
def test_inference_never_imports_lightning(tmp_path, tiny_gpt2, image_files, make_caption_shards):
    tiny_gpt2.save_pretrained(tmp_path / "m")
    pattern, _ = make_caption_shards(1, 2, name="test")
    out = subprocess.run([sys.executable, "-c", INFERENCE_WITHOUT_LIGHTNING, str(tmp_path / "m"),
                          str(image_files[0]), pattern], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout
