"""Self-critical training: the reward is mmcap's CIDEr-D, and the update favours better captions."""
import pytest
import torch
from helpers import module_args, tiny_config
from PIL import Image, ImageDraw

from mmcap import Captioner
from mmcap.metrics import caption_metrics
from mmcap.metrics.cider import CiderD
from mmcap.training.scst import SCSTConfig, cider_rewards, reward_scorer, self_critical_loss

GOOD, BAD = "a red circle on the left", "a blue square"
CORPUS = [[GOOD, "a red circle"], [BAD, "a blue square on the right"], ["a green triangle"], ["a small yellow star"]]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_equals_metrics_cider():
    refs = {i: r for i, r in enumerate(CORPUS)}
    preds = {0: "a red circle", 1: "a blue square on the left", 2: "a green star", 3: "a small yellow star"}
    rewards = cider_rewards(CiderD(), list(preds.values()), list(refs.values()))
    assert rewards.mean().item() == pytest.approx(caption_metrics(refs, preds, meteor=False)["CIDEr"], abs=1e-6)
    # with training document frequencies a single image gets a real reward
    single = cider_rewards(reward_scorer(CORPUS), [GOOD], [[GOOD]])
    assert single.item() > 1.0
    assert cider_rewards(CiderD(), [GOOD], [[GOOD]]).item() == 0.0


@pytest.mark.slow
def test_scst_moves_the_model_toward_the_higher_reward_caption():
    torch.manual_seed(0)
    model = Captioner.from_config(tiny_config("gpt2"), captions=[c for refs in CORPUS for c in refs])
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse([8, 8, 40, 40], fill="red")
    pixels, _ = model.preprocess([image])

    # cross-entropy on both captions: the model is torn between them
    batch = model.tokenizer([GOOD, BAD])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.encoder.set_freeze("all")
    for _ in range(60):
        loss = model(pixels.expand(2, -1, -1, -1), **batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def margin():
        s = model.score([image, image], [GOOD, BAD])
        return (s[0] - s[1]).item()

    before = margin()
    scorer = reward_scorer(CORPUS)
    cfg = SCSTConfig(num_samples=8, baseline="mean", sampling={"max_new_tokens": 8})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first_loss = None
    for step in range(15):
        loss, stats = self_critical_loss(model, pixels, [[GOOD, "a red circle"]], scorer, cfg)
        first_loss = first_loss if first_loss is not None else (loss.item(), stats)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert margin() > before + 1.0
    assert model.caption(image) == GOOD


def test_greedy_baseline_cancels_samples_equal_to_greedy():
    """Samples that are the greedy caption earn exactly the baseline: no gradient at all."""
    torch.manual_seed(1)
    model = Captioner.from_config(tiny_config("bert"), captions=[c for refs in CORPUS for c in refs]).eval()
    pixels = torch.randn(2, 3, 64, 64)
    cfg = SCSTConfig(num_samples=3, baseline="greedy", sampling={"temperature": 1e-4})
    loss, stats = self_critical_loss(model, pixels, [[GOOD], [BAD]], reward_scorer(CORPUS), cfg)
    assert stats["advantage_abs"] == 0.0 and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    with pytest.raises(ValueError):
        SCSTConfig(num_samples=1, baseline="mean")


def test_scst_stage_runs_in_lightning_from_a_saved_model(tmp_path, make_caption_shards):
    """`model.init_from` + `model.scst`: the Lightning stage that configs/demo_scst.yaml runs."""
    import lightning as L

    from mmcap.data.datamodule import CaptionDataModule
    from mmcap.training.module import CaptionModule

    pattern, _ = make_caption_shards(2, 4)
    torch.manual_seed(0)
    start = Captioner.from_config(tiny_config("gpt2", image_size=32), captions=["caption a", "another b"])
    start.save_pretrained(tmp_path / "start")
    module = CaptionModule(**module_args(init_from=str(tmp_path / "start"), image_size=32, lr=1e-3, warmup_steps=1,
                                       scst=SCSTConfig(num_samples=2, sampling={"max_new_tokens": 4})))
    data = CaptionDataModule(train_shards=pattern, image_size=32, batch_size=4, num_workers=0, shuffle_buffer=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert trainer.global_step == 3
    assert module._reward_scorer is not None
    before = Captioner.from_pretrained(tmp_path / "start").state_dict()
    after = module.captioner.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert module.hparams.training["scst"]["num_samples"] == 2
    assert module.hparams.training["init_from"] == str(tmp_path / "start")
