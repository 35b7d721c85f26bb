"""Plain (non-fixture) test helpers, importable from any test module as `from helpers import ...`
(tests/ is on sys.path: pytest puts it there for tests/conftest.py, which has no package above it).
Fixtures stay in conftest.py."""

CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle above a red circle", "a small yellow star"]


def tiny_config(family: str = "gpt2", **overrides) -> dict:
    cfg = {
        "encoder": {"arch": "resnet18"},
        "projection": {"kind": "linear", "max_grid": 8},
        "decoder": {"family": family, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_positions": 32, "dropout": 0.0},
        "image_size": 64,
        "max_caption_tokens": 16,
    }
    cfg.update(overrides)
    return cfg


def tiny_image_bytes(i: int = 0, fmt: str = "JPEG", size: tuple[int, int] = (20, 16)) -> bytes:
    """A small image whose colour depends on `i`, encoded as `fmt`."""
    import io

    from PIL import Image

    im = Image.new("RGB", size, ((40 * i) % 256, (90 * i + 30) % 256, (150 + 20 * i) % 256))
    out = io.BytesIO()
    im.save(out, fmt)
    return out.getvalue()


OPTIM_KEYS = {"lr", "encoder_lr_mult", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "total_steps",
              "freeze_encoder_steps", "fused"}
TRAINING_KEYS = {"label_smoothing", "token_dropout", "max_bad_steps", "tokenizer_max_captions", "val_meteor",
                 "grid_images", "channels_last", "init_from", "scst", "compile"}
CAPTIONER_KEYS = {"encoder", "projection", "decoder", "tokenizer", "image_size", "max_caption_tokens"}


def module_args(**flat) -> dict:
    """`CaptionModule` arguments (captioner/optim/training/generation blocks) from one flat dict
    such as `tiny_config()` plus options: tests stay short."""
    out = {"captioner": {}, "optim": {}, "training": {}}
    for key, value in flat.items():
        if key in CAPTIONER_KEYS:
            out["captioner"][key] = value
        elif key in OPTIM_KEYS:
            out["optim"][key] = value
        elif key in TRAINING_KEYS:
            out["training"][key] = value
        elif key in ("generation", "eval_generation"):
            out[key] = value
        else:
            raise TypeError(f"unknown CaptionModule option {key!r}")
    return out


def circle_images(size: tuple[int, int] = (80, 64), left: int = 8) -> list:
    """Four PIL images: a red, blue, green and yellow disc on white, each a little further right."""
    from PIL import Image, ImageDraw

    images = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).ellipse([left + 10 * i, 8, left + 32 + 10 * i, 40], fill=colour)
        images.append(im)
    return images


def trained_like_encoder(arch: str = "resnet18", **encoder_config):
    """A random `ResNetEncoder` in eval mode whose BatchNorms are not the identity of a fresh init
    (running statistics and affine parameters as training leaves them), so that folding them, or
    quantizing the result, has work to do."""
    import torch
    from torch import nn

    from mmcap.config import EncoderConfig
    from mmcap.model.encoder import ResNetEncoder

    torch.manual_seed(0)
    enc = ResNetEncoder(EncoderConfig(arch=arch, **encoder_config), image_size=64)
    with torch.no_grad():
        for bn in (m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return enc.eval()


def train_on_captions(model, image_files, steps: int):
    """`model` after `steps` AdamW steps on the four images and their CAPTIONS (eval mode)."""
    import torch

    torch.manual_seed(0)
    pixels, _ = model.preprocess([str(p) for p in image_files])
    tokens = model.tokenizer(CAPTIONS, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(pixels, tokens["input_ids"], tokens["attention_mask"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
