"""CaptionModule on tiny in-memory batches: loss, optimiser groups, schedule, freezing, NaN guard,
checkpoints (resume, load_from_checkpoint, export)."""
import math
import os

import lightning as L
import pytest
import torch
from helpers import CAPTIONS, module_args, tiny_config

from mmcap.training.contexts import token_dropout
from mmcap import Captioner
from mmcap.training import CaptionModule, NonFiniteLossError, WarmupCosine, param_groups
from mmcap.training.optim import no_decay_names

SCENES = [("red", "left"), ("blue", "right"), ("green", "left"), ("yellow", "right"),
          ("red", "right"), ("blue", "left"), ("green", "right"), ("yellow", "left")]
CAPTIONS = [f"a {colour} circle on the {side}" for colour, side in SCENES]


pytestmark = pytest.mark.usefixtures("one_thread")


def scene_pixels(colour: str, side: str, size: int = 64) -> torch.Tensor:
    from PIL import Image, ImageDraw

    from mmcap.images import eval_transform

    im = Image.new("RGB", (size, size), "white")
    x = 4 if side == "left" else size // 2 + 4
    ImageDraw.Draw(im).ellipse([x, size // 4, x + size // 2 - 8, 3 * size // 4], fill=colour)
    return eval_transform(size)(im)


def make_batches(tokenizer, n_batches: int = 2, per_batch: int = 4) -> list[dict]:
    batches = []
    for b in range(n_batches):
        idx = [(b * per_batch + i) % len(SCENES) for i in range(per_batch)]
        captions = [CAPTIONS[i] for i in idx]
        batches.append({
            "pixels": torch.stack([scene_pixels(*SCENES[i]) for i in idx]),
            **tokenizer(captions, 16),
            "captions": captions,
            "references": [[c] for c in captions],
            "keys": [f"img{i}" for i in idx],
            "skipped": {},
        })
    return batches


class Cycle(torch.utils.data.IterableDataset):
    """Endless batches, in a fixed cycle: batch i is batches[i % len(batches)]."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        i = 0
        while True:
            yield self.batches[i % len(self.batches)]
            i += 1


def loader(batches, endless=True):
    return torch.utils.data.DataLoader(Cycle(batches) if endless else batches, batch_size=None)


def tiny_module(**overrides) -> CaptionModule:
    torch.manual_seed(0)
    cfg = tiny_config(decoder={"family": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                               "max_positions": 32, "dropout": 0.0})
    kw = dict(lr=3e-3, warmup_steps=2, weight_decay=0.01, encoder_lr_mult=1.0,
              generation={"num_beams": 1, "max_new_tokens": 10})
    kw.update(overrides)
    module = CaptionModule(**module_args(**cfg, **kw))
    module.set_captioner(Captioner.from_config(module.captioner_config, captions=CAPTIONS))
    return module


def trainer(tmp_path, max_steps, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                default_root_dir=str(tmp_path), deterministic=True)
    args.update(kw)
    return L.Trainer(**args)


def fake_metrics(monkeypatch):
    """Metrics without Java or the metrics package: exact match only."""
    import mmcap.training.module as module_mod
    from mmcap.metrics import exact_match_rate

    def evaluate(references, predictions, meteor=True):
        em = exact_match_rate(references, predictions)
        return {"BLEU-4": em, "METEOR": None, "CIDEr": em, "exact_match": em}

    monkeypatch.setattr(module_mod, "evaluate_captions", evaluate)


def encoder_state(module):
    return {k: v.detach().clone() for k, v in module.captioner.encoder.state_dict().items()}


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_loss_falls(tmp_path):
    module = tiny_module(lr=1e-2, warmup_steps=3)
    batches = make_batches(module.captioner.tokenizer)
    with torch.no_grad():
        module.captioner.eval()
        before = sum(module.captioner(b["pixels"], b["input_ids"], b["attention_mask"]).item() for b in batches) / 2
    module.captioner.train()
    trainer(tmp_path, 30).fit(module, loader(batches))
    with torch.no_grad():
        module.captioner.eval()
        after = sum(module.captioner(b["pixels"], b["input_ids"], b["attention_mask"]).item() for b in batches) / 2
    assert module.global_step == 30
    assert after < 0.4 * before, (before, after)


def test_fusion_gates_get_their_own_rate_without_decay():
    from mmcap import Captioner
    from mmcap.training.optim import OptimConfig, build_optimizer

    cfg = tiny_config("llama")
    cfg["decoder"] = {**cfg["decoder"], "fusion": "cross_attention"}
    cap = Captioner.from_config(cfg, captions=CAPTIONS)
    optimizer, _ = build_optimizer(cap, OptimConfig(lr=1e-3, weight_decay=0.1), total_steps=10)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    gate_names = [n for n, _ in cap.named_parameters() if n.endswith("_gate")]
    assert len(gate_names) == 4  # attn and mlp gates of the 2 inserted blocks
    assert by_name["gates"]["initial_lr"] == pytest.approx(0.1) and by_name["gates"]["weight_decay"] == 0  # default 100x
    assert by_name["decoder"]["initial_lr"] == pytest.approx(1e-3)
    named = dict(cap.named_parameters())
    assert {id(p) for p in by_name["gates"]["params"]} == {id(named[n]) for n in gate_names}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)


def test_adamw_groups_no_decay_and_encoder_lr():
    module = tiny_module()
    cap = module.captioner
    groups = param_groups(cap, lr=1e-3, weight_decay=0.1, encoder_lr_mult=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoder", "encoder_no_decay", "decoder", "decoder_no_decay"}
    assert by_name["encoder"]["lr"] == pytest.approx(1e-4) and by_name["decoder"]["lr"] == 1e-3
    assert by_name["encoder_no_decay"]["weight_decay"] == 0 and by_name["decoder_no_decay"]["weight_decay"] == 0
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    # every parameter exactly once (the tied GPT-2 lm_head/wte counts once)
    all_ids = [i for s in ids.values() for i in s]
    assert len(all_ids) == len(set(all_ids)) == len({id(p) for p in cap.parameters()})
    named = dict(cap.named_parameters())
    no_decay = ids["encoder_no_decay"] | ids["decoder_no_decay"]
    for name in ["encoder.stem.1.weight", "encoder.layer1.0.bn1.bias",  # BatchNorm
                 "decoder.transformer.wte.weight", "decoder.transformer.wpe.weight",  # embeddings
                 "decoder.transformer.h.0.ln_1.weight", "decoder.transformer.h.0.attn.c_attn.bias",
                 "projection.norm.weight", "projection.proj.bias", "projection.row_embed"]:
        assert id(named[name]) in no_decay, name
    for name in ["encoder.stem.0.weight", "encoder.layer4.1.conv2.weight",
                 "decoder.transformer.h.0.attn.c_attn.weight", "decoder.transformer.h.1.crossattention.q_attn.weight",
                 "projection.proj.weight"]:
        assert id(named[name]) in ids["encoder"] | ids["decoder"], name
    assert {n for n in named if n.startswith("encoder.")} == {n for n in named if id(named[n]) in ids["encoder"] | ids["encoder_no_decay"]}
    assert "decoder.transformer.wte.weight" in no_decay_names(cap)


def test_schedule_warmup_then_cosine():
    f = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_in_trainer_follows_max_steps(tmp_path):
    module = tiny_module(lr=1e-2, warmup_steps=4, min_lr_ratio=0.0)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(tmp_path, 12, callbacks=[Record()]).fit(module, loader(make_batches(module.captioner.tokenizer)))
    expected = [1e-2 * WarmupCosine(4, 12)(s) for s in range(12)]
    assert lrs == pytest.approx(expected)
    assert lrs[3] == pytest.approx(1e-2) and lrs[11] < 1e-3


@pytest.mark.slow
def test_time_budget_anneals_within_max_time(tmp_path):
    """--trainer.max_time with max_steps -1: the cosine ends when the budget does, not where the
    clock cuts it (the schedule's length follows the measured pace)."""
    module = tiny_module(lr=1e-2, warmup_steps=2, min_lr_ratio=0.0)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    t = trainer(tmp_path, -1, max_time={"seconds": 6}, callbacks=[Record()])
    t.fit(module, loader(make_batches(module.captioner.tokenizer)))
    schedule = t.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    steps = t.global_step
    assert steps >= 15, steps  # several seconds of tiny steps
    assert abs(schedule.total_steps - steps) <= max(3, 0.15 * steps), (schedule.total_steps, steps)
    assert max(lrs) == pytest.approx(1e-2, rel=0.05)
    assert lrs[-1] < 0.1 * 1e-2  # annealed by the end of the budget
    # without max_time or max_steps there is no length to anneal over: a clear error
    with pytest.raises(ValueError, match="max_time"):
        trainer(tmp_path, -1, max_epochs=-1).fit(tiny_module(), loader(make_batches(module.captioner.tokenizer)))


def test_freeze_encoder_then_unfreeze(tmp_path):
    module = tiny_module(freeze_encoder_steps=3, lr=1e-2)
    batches = make_batches(module.captioner.tokenizer)
    states = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            states[trainer.global_step] = encoder_state(pl_module)
            states[f"wte{trainer.global_step}"] = pl_module.captioner.decoder.transformer.wte.weight.detach().clone()

    trainer(tmp_path, 6, callbacks=[Snapshot()]).fit(module, loader(batches))
    final = encoder_state(module)
    assert "stem.1.running_mean" in states[0]  # BatchNorm statistics are compared too
    for k, v in states[0].items():
        assert torch.equal(v, states[3][k]), f"{k} changed while the encoder was frozen"
    assert not torch.equal(states["wte0"], states["wte3"])  # the decoder trained meanwhile
    assert not torch.equal(final["stem.0.weight"], states[3]["stem.0.weight"])
    assert not torch.equal(final["layer4.1.conv2.weight"], states[3]["layer4.1.conv2.weight"])
    assert not torch.equal(final["stem.1.running_mean"], states[3]["stem.1.running_mean"])
    assert all(p.requires_grad for p in module.captioner.encoder.parameters())


@pytest.mark.parametrize("fused", [False, True], ids=["host-decides", "fused-adamw-on-device"])
def test_nan_loss_steps_are_skipped_then_raise(tmp_path, monkeypatch, fused):
    """The same steps are skipped, AdamW's state untouched by them, and the run stops after
    `max_bad_steps` in a row. With foreach AdamW (CPUs) the host decides each step; with fused
    AdamW (the default on GPUs) the guard hands the decision to the optimizer's kernel
    (`found_inf`) and the host only looks every `max_bad_steps` steps."""
    from mmcap.training import callbacks

    module = tiny_module(max_bad_steps=3, fused=fused)
    batches = make_batches(module.captioner.tokenizer)
    real_forward = type(module.captioner).forward
    bad_steps = {2, 3}
    snapshots, adam_steps, host_decisions = {}, {}, []

    def forward(self, *args, **kwargs):
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if module.global_step in bad_steps else loss

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = pl_module.captioner.decoder.transformer.wte.weight.detach().clone()
            state = trainer.optimizers[0].state
            adam_steps[trainer.global_step] = max((float(s["step"]) for s in state.values()), default=0.0)

    monkeypatch.setattr(type(module.captioner), "forward", forward)
    t = trainer(tmp_path, 6, callbacks=[Snapshot()])
    decide = t.strategy.reduce_boolean_decision
    monkeypatch.setattr(t.strategy, "reduce_boolean_decision",
                        lambda *a, **k: host_decisions.append(1) or decide(*a, **k))
    t.fit(module, loader(batches))
    assert bool(t.optimizers[0].defaults.get("fused")) == fused == callbacks._on_device(t)
    assert bool(host_decisions) != fused  # on the device path the host decided nothing
    assert module.bad_steps == 2
    assert t.global_step == 6
    assert torch.equal(snapshots[2], snapshots[3]) and torch.equal(snapshots[3], snapshots[4])  # skipped
    assert not torch.equal(snapshots[4], snapshots[5])  # training goes on
    assert adam_steps[4] == adam_steps[2] and adam_steps[5] == adam_steps[4] + 1  # skipped steps not counted
    assert torch.isfinite(module.captioner.decoder.transformer.wte.weight).all()

    bad_steps.update(range(100))
    with pytest.raises(NonFiniteLossError, match="3 consecutive" if not fused else "consecutive"):
        trainer(tmp_path, 12).fit(module, loader(batches))


def checkpointing_trainer(tmp_path, max_steps, **kw):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=4, save_top_k=0)
    return trainer(tmp_path, max_steps, callbacks=[ckpt, *kw.pop("callbacks", [])], enable_checkpointing=True, **kw)


class StopAt(L.Callback):
    """Interrupt a run after `step` optimizer steps, as a crash or a time limit would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.slow
def test_resume_from_last_matches_uninterrupted_run(tmp_path):
    # Dropout off and a fixed cycle of 4 batches, interrupted after step 8 (a multiple of 4): the
    # resumed run sees the same batches as the uninterrupted one, so the weights must be equal.
    straight = tiny_module(freeze_encoder_steps=3, warmup_steps=3)
    batches = make_batches(straight.captioner.tokenizer, n_batches=4, per_batch=2)
    trainer(tmp_path / "a", 12).fit(straight, loader(batches))

    first = tiny_module(freeze_encoder_steps=3, warmup_steps=3)
    checkpointing_trainer(tmp_path / "b", 12, callbacks=[StopAt(8)]).fit(first, loader(batches))
    assert torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 8

    resumed = tiny_module(freeze_encoder_steps=3, warmup_steps=3)  # replaced from the checkpoint
    t = checkpointing_trainer(tmp_path / "b", 12)
    t.fit(resumed, loader(batches), ckpt_path="last")
    assert t.global_step == 12
    sd_a, sd_b = straight.captioner.state_dict(), resumed.captioner.state_dict()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    assert max(int(s["step"]) for s in t.optimizers[0].state.values()) == 12  # AdamW state came back


@pytest.mark.slow
def test_load_from_checkpoint_and_export_round_trip(tmp_path, monkeypatch):
    from mmcap.training.cli import export_main

    module = tiny_module()
    batches = make_batches(module.captioner.tokenizer)
    t = checkpointing_trainer(tmp_path, 8)
    t.fit(module, loader(batches))
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # plain types only
    assert raw["hyper_parameters"]["captioner"]["decoder"]["family"] == "gpt2"
    assert "tokenizer.json" in raw["mmcap"]["tokenizer"]

    loaded = CaptionModule.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.captioner.tokenizer.hf.get_vocab() == module.captioner.tokenizer.hf.get_vocab()
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "model")]) == 0
    exported = Captioner.from_pretrained(tmp_path / "model")
    pixels = torch.cat([b["pixels"] for b in batches])
    expected = module.captioner.eval().caption(pixels, num_beams=2, max_new_tokens=10)
    assert loaded.captioner.eval().caption(pixels, num_beams=2, max_new_tokens=10) == expected
    assert exported.caption(pixels, num_beams=2, max_new_tokens=10) == expected


def test_validation_logs_metrics_and_grid(tmp_path, monkeypatch):
    fake_metrics(monkeypatch)
    module = tiny_module(grid_images=3)
    batches = make_batches(module.captioner.tokenizer)
    empty = dict(batches[0], pixels=batches[0]["pixels"][:0], keys=[], references=[], captions=[],
                 skipped={"unreadable_image": 4})
    del empty["input_ids"], empty["attention_mask"]
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    t = trainer(tmp_path, 0, logger=logger, limit_val_batches=None)
    # a repeated sample (same key in two batches) must count once
    results = t.validate(module, loader(batches + [empty, batches[0]], endless=False))
    assert results[0]["val/exact_match"] == pytest.approx(module_exact_match(module, batches))
    assert {"val/loss", "val/CIDEr", "val/BLEU-4"} <= set(results[0]) and "val/METEOR" not in results[0]
    event_files = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert event_files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_files[0].parent)).Reload()
    assert "val/captions" in acc.Tags()["images"]


def module_exact_match(module, batches):
    pixels = torch.cat([b["pixels"] for b in batches])
    refs = [r for b in batches for r in b["references"]]
    preds = module.captioner.eval().caption(pixels, num_beams=1, max_new_tokens=10)
    return sum(p == r[0] for p, r in zip(preds, refs)) / len(preds)


def test_gather_predictions_dedupes_keys():
    from mmcap.training.distributed import gather_predictions

    refs, preds = gather_predictions([("a", "x", ["r1"]), ("b", "y", ["r2"]), ("a", "x", ["r1"])])
    assert preds == {"a": "x", "b": "y"} and refs == {"a": ["r1"], "b": ["r2"]}


def test_hyperparameters_are_plain():
    module = tiny_module()
    for value in module.hparams.values():
        assert isinstance(value, (dict, list, str, int, float, bool, type(None))), type(value)
    again = CaptionModule(**{k: v for k, v in module.hparams.items()})
    assert again.hparams == module.hparams
    assert again.optim == module.optim and again.captioner_config == module.captioner_config
    assert not math.isnan(again.hparams.optim["lr"])


def test_token_dropout_hides_input_words_not_targets():
    module = tiny_module(token_dropout=1.0)
    cap = module.captioner.eval()
    batch = make_batches(cap.tokenizer, n_batches=1)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad(), token_dropout(cap, 1.0):
        hidden = cap(batch["pixels"], ids, mask)
    # the same loss as feeding BOS followed by UNKs, scored against the real next words
    unk = cap.tokenizer.hf.unk_token_id
    inputs = torch.where(ids == cap.tokenizer.bos_id, ids, torch.full_like(ids, unk))
    with torch.no_grad():
        logits = cap.decoder(input_ids=inputs[:, :-1], attention_mask=mask[:, :-1],
                             encoder_hidden_states=cap.encode(batch["pixels"])).logits
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert hidden.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():  # the hook is gone afterwards
        assert cap(batch["pixels"], ids, mask).item() != pytest.approx(hidden.item())


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit_weights(tmp_path, steps: int, **overrides) -> tuple[list[float], dict]:
    """The per-step losses and final weights of a short run through a frozen encoder, token dropout
    and a batch of another caption width."""
    module = tiny_module(**{"freeze_encoder_steps": 2, "token_dropout": 0.3, **overrides})
    batches = make_batches(module.captioner.tokenizer, n_batches=3, per_batch=4)
    batches[1] = {**batches[1], **module.captioner.tokenizer(["a red circle", "a blue circle", "a circle", "red"], 16)}
    torch.manual_seed(1)
    losses = Losses()
    trainer(tmp_path, steps, callbacks=[losses]).fit(module, loader(batches))
    assert (module._compiled_loss is None) == (not overrides.get("compile"))
    return losses.losses, {k: v.detach().clone() for k, v in module.captioner.state_dict().items()}


def test_compiled_training_step_trains_the_eager_model(tmp_path):
    """`training.compile` runs the loss through torch.compile (here its `aot_eager` backend, which
    traces forward and backward exactly as inductor does but runs them without generating code):
    one graph per variant (fullgraph: no break), through a frozen encoder, token dropout and a
    caption width that changes, and the weights of the eager run after every step's update."""
    from torch._dynamo.utils import counters

    eager_losses, want = fit_weights(tmp_path / "eager", 5)
    counters.clear()
    torch._dynamo.reset()
    losses, got = fit_weights(tmp_path / "compiled", 5, compile={"backend": "aot_eager", "fullgraph": True})
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=0)
    # frozen encoder; unfrozen; a second caption width (made dynamic, not compiled per width)
    assert counters["stats"]["unique_graphs"] == 3
    assert set(got) == set(want)  # the wrapper is not part of the model
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(want["decoder.transformer.h.0.mlp.c_fc.weight"],
                           tiny_module().captioner.state_dict()["decoder.transformer.h.0.mlp.c_fc.weight"])


def test_compile_option_is_checked_when_the_module_is_made():
    with pytest.raises(ValueError, match=r"unknown torch.compile option\(s\) \['modes'\]"):
        tiny_module(compile={"modes": "max-autotune"})
    with pytest.raises(TypeError, match="must be true, false or a mapping"):
        tiny_module(compile="yes")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MMCAP_SLOW_TESTS"), reason="inductor builds C++, about a minute: MMCAP_SLOW_TESTS=1")
def test_inductor_compiled_training_step_matches_eager(tmp_path):
    """torch.compile's default backend (inductor's generated kernels): each step's loss agrees with
    eager's to float rounding (fused kernels sum in another order; AdamW's first updates magnify
    that in weights whose gradient is near zero, so the losses are compared), and it falls. No token
    dropout: inductor draws its random numbers from its own generator."""
    want, _ = fit_weights(tmp_path / "eager", 6, token_dropout=0.0)
    torch._dynamo.reset()
    got, _ = fit_weights(tmp_path / "compiled", 6, token_dropout=0.0, compile=True)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=0)
    assert all(got[i + 3] < got[i] for i in range(3))  # each batch's loss, one cycle later
