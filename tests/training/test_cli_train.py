"""`mmcap fit|validate` through LightningCLI on every recipe in configs/, resume, export and eval."""
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mmcap.inference.cli import eval_main
from mmcap.config import CaptionerConfig
from mmcap.training.cli import export_main, lightning_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
METRIC_KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def shards(make_caption_shards):
    train, _ = make_caption_shards(n_shards=2, per_shard=4, name="train")
    val, val_caps = make_caption_shards(n_shards=1, per_shard=3, name="val")
    return train, val, val_caps


def tiny_overrides(tmp_path, train, val, max_steps=2) -> list[str]:
    """Recipe overrides: no pretrained weights, tiny sizes, CPU, tiny shards, quick decoding."""
    return [
        "--model.captioner.encoder.arch", "resnet18", "--model.captioner.encoder.weights", "null",
        "--model.captioner.decoder.pretrained", "null", "--model.captioner.decoder.hidden_size", "32",
        "--model.captioner.decoder.num_layers", "2", "--model.captioner.decoder.num_heads", "2",
        "--model.captioner.projection.max_grid", "8",
        "--model.generation.num_beams", "1", "--model.generation.max_new_tokens", "5",
        "--model.eval_generation", "null", "--model.training.grid_images", "2", "--model.training.init_from", "null",
        "--data.demo_dir", "null", "--data.train_shards", train, "--data.val_shards", val, "--data.test_shards", val,
        "--data.image_size", "32", "--data.batch_size", "2", "--data.eval_batch_size", "2",
        "--data.num_workers", "0", "--data.shuffle_buffer", "4", "--data.samples_per_epoch", "8",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.strategy", "auto", "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--test_after_fit", "false", "--export_dir", "null",
    ]


# demo.yaml stays in the quick run (-m "not slow"); the other recipes are marked slow
@pytest.mark.parametrize("recipe", [r if r == "demo.yaml" else pytest.param(r, marks=pytest.mark.slow) for r in RECIPES])
def test_recipe_parses_builds_and_trains(recipe, shards, tmp_path):
    train, val, _ = shards
    assert lightning_main(["fit", "--config", str(CONFIGS / recipe), *tiny_overrides(tmp_path, train, val)]) == 0
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    hp = ckpt["hyper_parameters"]["captioner"]
    assert hp["image_size"] == 32 and hp["max_caption_tokens"] == ckpt["datamodule_hyper_parameters"]["max_caption_tokens"]
    assert hp["decoder"]["family"] == CaptionerConfig.from_recipe(CONFIGS / recipe).decoder.family
    assert "val/CIDEr" in ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "ModelCheckpoint" in k)]["monitor"]


@pytest.mark.slow
def test_demo_fit_test_export_resume_validate_and_eval(shards, tmp_path, capsys):
    train, val, val_caps = shards
    args = ["--config", str(CONFIGS / "demo.yaml"), *tiny_overrides(tmp_path, train, val),
            "--test_after_fit", "true", "--export_dir", str(tmp_path / "model"), "--trainer.precision", "32"]
    assert lightning_main(["fit", *args]) == 0
    out = capsys.readouterr().out
    final = json.loads(out.split("mmcap: final test metrics: ")[1].splitlines()[0])
    assert {f"test/{k}" for k in METRIC_KEYS} <= set(final) | {"test/METEOR"}
    assert final["test/samples"] == len(val_caps)

    # resume: same directories, the run goes on from step 2 to step 4
    assert lightning_main(["fit", *args, "--trainer.max_steps", "4", "--ckpt_path", "last", "--test_after_fit", "false"]) == 0
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 4

    # validate from a checkpoint file: the model (tokenizer included) comes from the checkpoint
    assert lightning_main(["validate", "--config", str(CONFIGS / "demo.yaml"), *tiny_overrides(tmp_path, train, val),
                           "--ckpt_path", str(last)]) == 0

    # export from the checkpoint gives the same captions as the model exported after fit
    from mmcap import Captioner

    assert export_main(["--ckpt", str(last), "--out", str(tmp_path / "exported")]) == 0
    pixels = torch.randn(3, 3, 32, 32)
    exported = Captioner.from_pretrained(tmp_path / "exported")
    assert exported.config.image_size == 32
    from mmcap.training import CaptionModule

    module = CaptionModule.load_from_checkpoint(last, weights_only=True)
    assert exported.caption(pixels, num_beams=2) == module.captioner.eval().caption(pixels, num_beams=2)

    # mmcap eval --json on the exported model: one line, exactly the metric keys
    capsys.readouterr()
    assert eval_main(["--model", str(tmp_path / "exported"), "--data", val, "--json", "--no-meteor",
                      "--num-beams", "1", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and set(json.loads(lines[0])) == METRIC_KEYS


def test_eval_counts_corrupt_samples_and_takes_several_patterns(shards, tmp_path, capsys, tiny_image):
    from mmcap import Captioner
    from helpers import tiny_config

    train, val, val_caps = shards
    model = Captioner.from_config(tiny_config(image_size=32), captions=["caption one", "another two"])
    model.save_pretrained(tmp_path / "model")
    bad = tmp_path / "bad" / "bad-000000.tar"
    bad.parent.mkdir()
    with tarfile.open(bad, "w") as tar:
        for name, data in [("broken.jpg", b"not a jpeg"), ("broken.txt", b"a caption"),
                           ("good.jpg", tiny_image(3)), ("good.txt", b"caption good")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rc = eval_main(["--model", str(tmp_path / "model"), "--data", val, str(tmp_path / "bad" / "bad-{000000..000000}.tar"),
                    "--num-beams", "1", "--max-new-tokens", "4", "--no-meteor"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "unreadable_image=1" in captured.err
    assert f"{len(val_caps) + 1} images" in captured.out
    assert "CIDEr" in captured.out

    assert eval_main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "nothing-*.tar")]) == 1
    assert "nothing" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_from_features_through_the_cli(shards, tmp_path, capsys):
    """`mmcap features --config` on each split, then `mmcap fit --data.features_dir`: trains, tests
    on the test features, and exports a model that carries the features' encoder."""
    from mmcap import Captioner
    from mmcap.cli import main as mmcap_main
    from mmcap.training.features import load_encoder

    train, val, val_caps = shards
    feats = tmp_path / "feats"
    for split, pattern in (("train", train), ("val", val), ("test", val)):
        assert mmcap_main(["features", "--config", str(CONFIGS / "demo.yaml"), "--image-size", "32", "--data",
                           pattern, "--out", str(feats), "--split", split, "--quiet"]) == 0
    args = ["--config", str(CONFIGS / "demo.yaml"), *tiny_overrides(tmp_path, train, val),
            "--data.train_shards", "null", "--data.val_shards", "null", "--data.test_shards", "null",
            "--data.features_dir", str(feats), "--model.captioner.decoder.hidden_size", "64",
            "--test_after_fit", "true", "--export_dir", str(tmp_path / "model")]
    capsys.readouterr()
    assert lightning_main(["fit", *args]) == 0
    final = json.loads(capsys.readouterr().out.split("mmcap: final test metrics: ")[1].splitlines()[0])
    assert final["test/samples"] == len(val_caps)
    model = Captioner.from_pretrained(tmp_path / "model")
    encoder, _ = load_encoder(feats)
    assert (model.config.image_size, model.config.encoder.freeze) == (32, "all")
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(), encoder.state_dict().values()))


@pytest.mark.slow
def test_preset_file_as_the_model_exports_that_config(shards, tmp_path):
    """`--model.captioner PRESET`: the exported config.json is the preset (defaults filled in,
    without the version and the resolved decoder config)."""
    from mmcap import CaptionerConfig

    train, val, _ = shards
    preset = tmp_path / "tiny.yaml"
    # a preset given on the command line is applied over the recipe's block: it names every key
    # the recipe's preset sets (output_stride included), as the presets in configs/model/ do
    preset.write_text("encoder: {arch: resnet18, output_stride: 32}\nprojection: {kind: mlp, max_grid: 8}\n"
                      "decoder: {family: gpt2, hidden_size: 32, num_layers: 2, num_heads: 2, max_positions: 24}\n"
                      "tokenizer: {kind: wordlevel, vocab_size: 100}\nimage_size: 32\nmax_caption_tokens: 12\n")
    args = [a for a in tiny_overrides(tmp_path, train, val) if True]
    cut = args.index("--model.generation.num_beams")  # drop the inline captioner overrides
    args = args[cut:]
    assert lightning_main(["fit", "--config", str(CONFIGS / "demo.yaml"), *args, "--model.captioner", str(preset),
                           "--data.max_caption_tokens", "12", "--export_dir", str(tmp_path / "model")]) == 0
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved.pop("mmcap_version") and saved.pop("resolved")["decoder"]["n_embd"] == 32
    assert saved == CaptionerConfig.load(preset).to_dict()
    generation = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    assert generation["num_beams"] == 1 and generation["max_new_tokens"] == 5


@pytest.mark.slow
def test_predict_captions_predict_shards_from_a_checkpoint(shards, tmp_path, capsys):
    train, val, val_caps = shards
    args = ["--config", str(CONFIGS / "demo.yaml"), *tiny_overrides(tmp_path, train, val)]
    assert lightning_main(["fit", *args]) == 0
    out = tmp_path / "captions.jsonl"
    assert lightning_main(["predict", *args, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                           "--data.predict_shards", val, "--predict_output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(val_caps)
    assert all(set(r) == {"image", "shard", "caption", "log_prob"} for r in rows)
    assert f"mmcap predict: wrote {len(val_caps)} results to {out}" in capsys.readouterr().out
